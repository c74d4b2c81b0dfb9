"""The embedded SeaweedFS server (`kubetune run --embedded-s3`, and every test's S3)."""

from __future__ import annotations

from kubetune.artifacts.embedded_s3 import GRPC_PORT_OFFSET, SeaweedS3


def test_component_ports_never_land_on_a_grpc_port(tmp_path):
    """weed mini serves each component's gRPC on its port + 10000 and exits when a chosen port
    is one of those (a restart in CI failed so): no port may be another's gRPC port."""
    server = SeaweedS3(tmp_path / "s3")
    for _ in range(200):
        ports = server._component_ports()
        assert len(ports) == 3
        plain = {server.port, *ports}
        grpc = {p + GRPC_PORT_OFFSET for p in plain}
        assert len(plain) == 4 and not plain & grpc, ports
        assert all(p + GRPC_PORT_OFFSET <= 65535 for p in ports)


def test_the_server_restarts_with_its_data(tmp_path):
    with SeaweedS3(tmp_path / "s3", buckets=("models",)) as server:
        server.client().put_object(Bucket="models", Key="a.txt", Body=b"kept")
        for _ in range(3):
            server.stop()
            server.start()
            assert server.client().get_object(Bucket="models", Key="a.txt")["Body"].read() == b"kept"
