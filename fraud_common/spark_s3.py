"""Hadoop s3a settings for Spark against an S3-compatible store: one definition for every Spark.

Used by the SparkApplication the pipeline submits (``pipeline.k8s``) and by a SparkSession that
reads s3 itself (``data_preparation.main``). Keys never go into the Spark configuration (the
Spark UI and event logs show it): the AWS SDK reads ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY`` from the process environment, which the ``fraud-detection-s3`` Secret
fills in the cluster.
"""

from __future__ import annotations

S3A = "org.apache.hadoop.fs.s3a.S3AFileSystem"
# AWS SDK v2 (Hadoop 3.4+): credentials from the environment variables.
ENV_CREDENTIALS = "software.amazon.awssdk.auth.credentials.EnvironmentVariableCredentialsProvider"


def s3a_conf(endpoint: str, region: str = "") -> dict[str, str]:
    """``spark.hadoop.fs.s3a.*`` settings for ``endpoint`` ("" = AWS) in ``region``."""
    conf = {
        "spark.hadoop.fs.s3a.impl": S3A,
        # s3:// URIs (the project's own spelling) go through s3a as well.
        "spark.hadoop.fs.s3.impl": S3A,
        "spark.hadoop.fs.s3a.aws.credentials.provider": ENV_CREDENTIALS,
        # Hadoop 3.4.3/3.5 default to the "analytics" stream, which needs the analyticsaccelerator-s3
        # jar (HADOOP-19559); the classic stream needs only hadoop-aws and the AWS SDK.
        "spark.hadoop.fs.s3a.input.stream.type": "classic",
    }
    if region:
        conf["spark.hadoop.fs.s3a.endpoint.region"] = region
    if endpoint:
        conf["spark.hadoop.fs.s3a.endpoint"] = endpoint
        # MinIO and most S3-compatible stores need path-style addressing.
        conf["spark.hadoop.fs.s3a.path.style.access"] = "true"
        conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] = str(endpoint.startswith("https://")).lower()
    return conf
