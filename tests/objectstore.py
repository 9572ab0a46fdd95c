"""A real S3-protocol server for tests and benchmarks: moto's standalone server, started as a
process of its own on a free port (boto3 and the agents talk to it over HTTP, as they would to
AWS or MinIO). Its request log says which object was fetched, and how."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from fleet_server.broker import free_port

ACCESS_KEY, SECRET_KEY, REGION = "edgefleet-test", "edgefleet-test-secret", "us-east-1"


class MotoServer:
    """``with MotoServer(log_dir) as s3:``; ``auth=True`` makes it check credentials (moto's
    IAM mode: the first requests create the user whose key :meth:`client` then uses; moto
    cannot check presigned URLs in that mode)."""

    def __init__(self, log_dir: Path, *, auth: bool = False) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"moto-{self.port}.log"
        self.auth = auth
        self.access_key, self.secret_key = ACCESS_KEY, SECRET_KEY
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MotoServer:
        env = {**os.environ}
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError as e:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    log = self.log_path.read_text()[-2000:]
                    raise RuntimeError(f"moto did not start: {log}") from e
                time.sleep(0.1)
        if self.auth:
            self._create_user()
        return self

    def _create_user(self) -> None:
        import json

        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
            region_name=REGION,
        )
        iam.create_user(UserName="edgefleet")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(
            UserName="edgefleet", PolicyName="s3", PolicyDocument=json.dumps(policy)
        )
        key = iam.create_access_key(UserName="edgefleet")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def env(self, secret_key: str | None = None) -> dict[str, str]:
        """The AWS variables a server process reads to reach this store."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key,
            "AWS_REGION": REGION,
        }

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=Config(signature_version="s3v4"),
        )

    def new_bucket(self) -> str:
        name = f"edgefleet-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def gets(self, key: str) -> list[str]:
        """The request lines of the GETs of ``key`` so far (with their query: a presigned GET
        carries its signature there)."""
        pattern = re.compile(r'"(GET /[^ ]*' + re.escape(key) + r'[^ ]*) HTTP/1\.[01]" (\d+)')
        text = self.log_path.read_text(errors="replace")
        return [f"{m.group(1)} -> {m.group(2)}" for m in pattern.finditer(text)]
