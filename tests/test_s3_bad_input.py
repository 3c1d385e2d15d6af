"""Bad remote input: an unreachable endpoint, a missing bucket, wrong credentials. Each is one
clear error, and nothing stored earlier is lost. The S3 server here checks credentials."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import boto3
import pytest
import s3fs

from flows.finetune import finetune
from loraflow.builtin import builtin_path
from loraflow.dataset import generate_shapes
from tests.conftest import free_port, wait_for
from tests.helpers import run, small_config

BUCKET = "lf-auth"


@pytest.fixture(scope="module")
def auth_s3(tmp_path_factory):
    """A moto server that enforces credentials after the first three requests, which create an
    IAM user with a key and an allow-all policy; then one complete run into its bucket."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(endpoint + "/moto-api/")
        iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                           region_name="us-east-1")
        iam.create_user(UserName="loraflow")
        iam.put_user_policy(UserName="loraflow", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="loraflow")["AccessKey"]
        options = {"endpoint_url": endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"],
                   "client_kwargs": {"region_name": "us-east-1"}}
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key["AccessKeyId"],
                     aws_secret_access_key=key["SecretAccessKey"], region_name="us-east-1").create_bucket(Bucket=BUCKET)
        local = tmp_path_factory.mktemp("auth-upload")
        generate_shapes(local / "data", variants=1)
        fs.put(str(local / "data"), f"{BUCKET}/data", recursive=True)
        fs.put(str(builtin_path("tiny-sd")), f"{BUCKET}/model", recursive=True)
        cfg = small_config(f"s3://{BUCKET}/store", f"s3://{BUCKET}/data", model={"source": f"s3://{BUCKET}/model"},
                           storage_options=options)
        run(cfg)
        yield fs, cfg
    finally:
        server.terminate()
        server.wait(timeout=30)


def snapshot(fs) -> dict[str, str]:
    fs.invalidate_cache()
    return {path: info["ETag"] for path, info in fs.find(BUCKET, detail=True).items() if "/reports/" not in path}


def fails_cleanly(fs, cfg, *names: str) -> None:
    before = snapshot(fs)
    buckets = fs.ls("", refresh=True)
    with pytest.raises(Exception) as info:
        finetune(cfg)
    message = str(info.value)
    for name in names:
        assert name in message, message
    assert snapshot(fs) == before  # nothing lost, nothing half-written
    assert fs.ls("", refresh=True) == buckets  # and no bucket made up


def with_changes(cfg, **changes):
    data = cfg.model_dump()
    for dotted, value in changes.items():
        *parents, name = dotted.split("__")
        target = data
        for parent in parents:
            target = target[parent]
        target[name] = value
    return type(cfg).model_validate(data)


def test_wrong_credentials(auth_s3):
    fs, cfg = auth_s3
    bad = with_changes(cfg, storage_options={**cfg.storage_options, "secret": "not-the-secret"})
    fails_cleanly(fs, bad, f"s3://{BUCKET}/store", "denied", "credentials")


def test_missing_store_bucket(auth_s3):
    fs, cfg = auth_s3
    fails_cleanly(fs, with_changes(cfg, store="s3://no-such-bucket/store"), "no-such-bucket", "does not exist")


def test_missing_dataset_bucket(auth_s3):
    fs, cfg = auth_s3
    fails_cleanly(fs, with_changes(cfg, dataset__source="s3://no-such-bucket/data"), "dataset.source", "no-such-bucket")


def test_missing_model_folder(auth_s3):
    fs, cfg = auth_s3
    fails_cleanly(fs, with_changes(cfg, model__source=f"s3://{BUCKET}/no-model"), "model.source", "no-model")


def test_unreachable_endpoint(auth_s3):
    fs, cfg = auth_s3
    closed = f"http://127.0.0.1:{free_port()}"
    bad = with_changes(cfg, storage_options={**cfg.storage_options, "endpoint_url": closed})
    fails_cleanly(fs, bad, "store", closed)
