"""TLS and API keys (specdec/rpc/security.py, the SDK's credentials, the services' flags), against real servers.

Certificates come from the openssl CLI, made once per module: a CA, a server certificate for 127.0.0.1
and localhost, a client certificate from the same CA, and a second CA with a client certificate of its
own (which a server trusting only the first must refuse). Every server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specdec.ops import cli

from specdec.ops import healthcheck

from specdec.rpc import security
from specdec.ops.launcher import _Health
from specdec.pb import generation_pb2, generation_pb2_grpc
from specdec.rpc.security import ClientTLS, ServerTLS
from specdec_client import AsyncClient, Client, InvalidArgument, Unauthenticated, Unavailable
from test_client import FakeServer, check_result

pytestmark = pytest.mark.timeout(120)

OPENSSL = "/usr/bin/openssl"
KEY = "right-key-0123456789"
OTHER_KEY = "second-key"
WRONG_KEY = "wrong-key-presented"


# ---------------------------------------------------------------------------------------------------------
# certificates


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA nobody trusts
    stranger_cert: str  # a client certificate of other_ca
    stranger_key: str


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=specdec test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)


def _make_leaf(folder: Path, name: str, ca: str, extensions: str) -> None:
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    _make_ca(folder, "ca")
    _make_ca(folder, "other-ca")
    _make_leaf(folder, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                       "extendedKeyUsage=serverAuth\n")
    _make_leaf(folder, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _make_leaf(folder, "stranger", "other-ca", "extendedKeyUsage=clientAuth\n")
    f = lambda name: str(folder / name)  # noqa: E731
    return Pki(f("ca.pem"), f("server.pem"), f("server.key"), f("client.pem"), f("client.key"), f("other-ca.pem"),
               f("stranger.pem"), f("stranger.key"))


def one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------------
# key files and TLS settings


def test_api_keys_come_from_the_file_and_the_environment(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# production\nkey-a\n\n   key-b  \n# key-c is revoked\n")
    assert security.load_api_keys(str(keys)) == {"key-a", "key-b"}
    assert security.load_api_keys(str(keys), " key-d, ,key-a") == {"key-a", "key-b", "key-d"}
    assert security.load_api_keys(None, "key-d,key-e") == {"key-d", "key-e"}
    assert security.load_api_keys(None, "") == frozenset()  # no keys: an open API

    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError) as info:
        security.load_api_keys(str(empty), "key-d")  # a key file meant to close the API must hold a key
    assert "--api-keys-file" in one_line(info.value) and "holds no key" in str(info.value)
    with pytest.raises(ValueError, match=r"--api-keys-file .*/missing: no such file"):
        security.load_api_keys(str(tmp_path / "missing"))
    commented = tmp_path / "commented"
    commented.write_text("key-a\nkey-b # the old one\n")
    with pytest.raises(ValueError, match="line 2: a key may not contain spaces") as info:
        security.load_api_keys(str(commented))
    assert "key-b" not in str(info.value)  # errors never echo a key


def test_tls_settings_are_checked_with_one_line_naming_the_flag(pki, tmp_path):
    assert security.server_tls(None, None) is None and security.server_tls("", "", "") is None
    tls = security.server_tls(pki.server_cert, pki.server_key, pki.ca)
    assert tls == ServerTLS(pki.server_cert, pki.server_key, pki.ca) and tls.mutual
    assert not security.server_tls(pki.server_cert, pki.server_key).mutual
    not_pem = tmp_path / "cert.txt"
    not_pem.write_text("hello")
    cases = [
        (lambda: security.server_tls(pki.server_cert, None), "--tls-cert needs --tls-key"),
        (lambda: security.server_tls(None, pki.server_key), "--tls-key needs --tls-cert"),
        (lambda: security.server_tls(None, None, pki.ca), "--tls-client-ca needs --tls-cert"),
        (lambda: security.server_tls(pki.server_cert, str(tmp_path / "nokey")), "--tls-key .*/nokey: no such file"),
        (lambda: security.server_tls(str(not_pem), pki.server_key), "--tls-cert .*cert.txt: not a PEM file"),
        (lambda: security.server_tls(pki.server_cert, pki.server_key, str(tmp_path / "ca")),
         "--tls-client-ca .*/ca: no such file"),
        (lambda: security.client_tls(None, pki.client_cert, flag_prefix="--internal-tls"),
         "--internal-tls-cert needs --internal-tls-key"),
        (lambda: security.client_tls(str(tmp_path / "ca"), flag_prefix="--internal-tls"),
         "--internal-tls-ca .*/ca: no such file"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            build()
        one_line(info.value)
    # The same check guards credentials built later (a file removed after start-up).
    with pytest.raises(ValueError, match="--tls-cert .*gone.pem: no such file"):
        security.server_credentials(ServerTLS(str(tmp_path / "gone.pem"), pki.server_key))
    assert security.client_tls(None) is None
    assert security.client_tls(pki.ca) == ClientTLS(pki.ca)


def _scheduler(**tls):
    from scheduler_svc.config import SchedulerConfig

    return SchedulerConfig(verifier="127.0.0.1:1", **tls)


def _verifier(**tls):
    from verifier_svc.config import VerifierConfig

    return VerifierConfig(**tls)


def _proposer(**tls):
    from proposer_svc.config import ProposerConfig

    return ProposerConfig(**tls)


@pytest.mark.parametrize("make", [_scheduler, _verifier, _proposer], ids=["scheduler", "verifier", "proposer"])
def test_each_service_refuses_a_bad_tls_configuration_in_one_line(make, pki, tmp_path):
    with pytest.raises(ValueError, match="--tls-cert needs --tls-key") as info:
        make(tls_cert=pki.server_cert)
    one_line(info.value)
    with pytest.raises(ValueError, match="--tls-key .*/absent.key: no such file") as info:
        make(tls_cert=pki.server_cert, tls_key=str(tmp_path / "absent.key"))
    one_line(info.value)
    with pytest.raises(ValueError, match="--tls-client-ca needs"):
        make(tls_client_ca=pki.ca)
    make(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)  # a good one passes


def test_scheduler_security_flags_env_and_start_up_log(pki, tmp_path, monkeypatch):
    from scheduler_svc.config import config_from_args

    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n")
    monkeypatch.setenv("SPECDEC_API_KEYS", OTHER_KEY)
    monkeypatch.setenv("SPECDEC_INTERNAL_TLS_CA", pki.ca)
    config = config_from_args(["--verifier", "h:1", "--tls-cert", pki.server_cert, "--tls-key", pki.server_key,
                               "--api-keys-file", str(keys), "--internal-tls-cert", pki.client_cert,
                               "--internal-tls-key", pki.client_key])
    assert config.tls == ServerTLS(pki.server_cert, pki.server_key)
    assert config.internal_tls == ClientTLS(pki.ca, pki.client_cert, pki.client_key)
    assert config.accepted_api_keys() == {KEY, OTHER_KEY}
    # The start-up log and the repr name the key file, never a key.
    for text in (config.describe(), repr(config)):
        assert KEY not in text and OTHER_KEY not in text
    assert str(keys) in config.describe()
    with pytest.raises(ValueError, match="--internal-tls-key needs --internal-tls-cert"):
        _scheduler(internal_tls_ca=pki.ca, internal_tls_key=pki.client_key)
    with pytest.raises(ValueError, match="--api-keys-file .*: no such file"):
        _scheduler(api_keys_file=str(tmp_path / "nope"))
    with pytest.raises(SystemExit):  # the command line: argparse prints the one line and exits 2
        config_from_args(["--verifier", "h:1", "--tls-key", pki.server_key])


def test_specdec_up_checks_its_security_flags(pki, tmp_path, monkeypatch):
    monkeypatch.delenv("SPECDEC_API_KEYS", raising=False)
    args = cli.build_parser().parse_args(["up", "--tls-cert", pki.server_cert, "--tls-key", pki.server_key])
    flags, probe, keys_required = cli._public_security(args)
    assert flags == ["--tls-cert", pki.server_cert, "--tls-key", pki.server_key]
    assert probe == ClientTLS(pki.server_cert) and not keys_required  # a self-signed certificate trusts itself
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n")
    args = cli.build_parser().parse_args(["up", "--tls-cert", pki.server_cert, "--tls-key", pki.server_key,
                                          "--tls-ca", pki.ca, "--api-keys-file", str(keys)])
    flags, probe, keys_required = cli._public_security(args)
    assert flags[-2:] == ["--api-keys-file", str(keys)] and probe == ClientTLS(pki.ca) and keys_required
    args = cli.build_parser().parse_args(["up", "--tls-cert", pki.server_cert])
    with pytest.raises(ValueError, match="--tls-cert needs --tls-key"):
        cli._public_security(args)


# ---------------------------------------------------------------------------------------------------------
# a Generation server with keys and TLS


class CountingInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call that reaches the server, refused or not, by method name."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    async def intercept_service(self, continuation, details):
        name = details.method.rsplit("/", 1)[-1]
        self.calls[name] = self.calls.get(name, 0) + 1
        return await continuation(details)


class SecureFakeServer(FakeServer):
    """test_client's fake Generation server (prompt "hello" succeeds) with API keys and/or TLS."""

    def __init__(self, tls: ServerTLS | None = None, keys: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.tls = tls
        self.keys = keys
        self.counter = CountingInterceptor()

    async def _start(self) -> int:
        self.server = grpc.aio.server(interceptors=[self.counter, *security.api_key_interceptors(self.keys)])
        generation_pb2_grpc.add_GenerationServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(("specdec.v1.Generation", reflection.SERVICE_NAME), self.server)
        port = security.bind(self.server, "127.0.0.1:0", self.tls)
        await self.server.start()
        return port


@pytest.fixture
def make_server():
    servers = []

    def make(**kwargs) -> SecureFakeServer:
        server = SecureFakeServer(**kwargs)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def _call(channel: grpc.Channel, metadata=()) -> grpc.RpcError | generation_pb2.GenerateResult:
    try:
        return generation_pb2_grpc.GenerationStub(channel).GenerateUnary(
            generation_pb2.GenerateRequest(prompt="hello"), metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        return exc


def test_api_keys_guard_the_generation_api_but_not_health_or_reflection(make_server):
    server = make_server(keys=(KEY, OTHER_KEY))
    with grpc.insecure_channel(server.target) as channel:
        missing = _call(channel)
        assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing API key" in missing.details() and "authorization: Bearer" in missing.details()
        wrong = _call(channel, [("authorization", f"Bearer {WRONG_KEY}")])
        assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED and wrong.details() == "invalid API key"
        not_bearer = _call(channel, [("authorization", f"Basic {KEY}")])
        assert not_bearer.code() == grpc.StatusCode.UNAUTHENTICATED and KEY not in not_bearer.details()
        streamed = generation_pb2_grpc.GenerationStub(channel).Generate(
            generation_pb2.GenerateRequest(prompt="hello"), metadata=[("authorization", f"Bearer {WRONG_KEY}")])
        with pytest.raises(grpc.RpcError) as info:
            list(streamed)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert server.servicer.calls["hello"] == 0  # refused calls never reached the servicer

        for key in (KEY, OTHER_KEY):
            result = _call(channel, [("authorization", f"Bearer {key}")])
            assert result.text == "abcde"
        assert server.servicer.calls["hello"] == 2

        # A method the server does not have is refused the same way: its existence is not revealed.
        unknown = channel.unary_unary("/specdec.v1.Generation/Nope")
        with pytest.raises(grpc.RpcError) as info:
            unknown(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # Orchestrators probe health without credentials; reflection stays open too.
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        assert "specdec.v1.Generation" in {s.name for a in answers for s in a.list_services_response.service}


def test_a_tls_port_refuses_plaintext_and_serves_clients_trusting_its_ca(make_server, pki):
    server = make_server(tls=ServerTLS(pki.server_cert, pki.server_key))
    with Client(server.target, retries=0, timeout=5) as plain:
        with pytest.raises(Unavailable):
            plain.generate("hello")
    with Client(server.target, retries=0, timeout=5, tls_ca=pki.other_ca) as distrustful:
        with pytest.raises(Unavailable):  # the server's certificate does not chain to the CA it trusts
            distrustful.generate("hello")
    with Client(server.target, retries=0, timeout=5, tls_ca=pki.ca) as client:
        check_result(client.generate("hello"), "eos")
    with open(pki.ca, "rb") as f:
        with Client(server.target, retries=0, timeout=5, root_certificates=f.read()) as client:
            assert client.stream("hello").collect().text == "abcde"
    assert server.servicer.calls["hello"] == 2
    # The container health check and the launcher's readiness probe speak TLS when told to.
    assert healthcheck.main([server.target, "--tls-ca", pki.ca]) == 0
    assert healthcheck.main([server.target, "--timeout", "1"]) == 1
    probe, plain = _Health(server.target, ClientTLS(pki.ca)), _Health(server.target)
    try:
        assert any(probe.serving() or time.sleep(0.1) for _ in range(20)), probe.last
        assert not plain.serving()
    finally:
        probe.close()
        plain.close()


def test_a_mutual_tls_port_refuses_clients_without_an_accepted_certificate(make_server, pki):
    server = make_server(tls=ServerTLS(pki.server_cert, pki.server_key, pki.ca))
    with Client(server.target, retries=0, timeout=5, tls_ca=pki.ca) as anonymous:
        with pytest.raises(Unavailable):
            anonymous.generate("hello")
    with Client(server.target, retries=0, timeout=5, tls_ca=pki.ca, tls_cert=pki.stranger_cert,
                tls_key=pki.stranger_key) as stranger:
        with pytest.raises(Unavailable):
            stranger.generate("hello")
    with Client(server.target, retries=0, timeout=5, tls_ca=pki.ca, tls_cert=pki.client_cert,
                tls_key=pki.client_key) as client:
        assert client.generate("hello").text == "abcde"
    assert server.servicer.calls["hello"] == 1
    assert healthcheck.main([server.target, "--tls-ca", pki.ca, "--tls-cert", pki.client_cert,
                             "--tls-key", pki.client_key]) == 0


def test_the_sdk_and_the_cli_with_an_api_key_over_tls(make_server, pki, monkeypatch, capsys):
    server = make_server(tls=ServerTLS(pki.server_cert, pki.server_key), keys=(KEY,))
    monkeypatch.delenv("SPECDEC_API_KEY", raising=False)
    with Client(server.target, timeout=10, tls_ca=pki.ca, api_key=KEY) as client:
        check_result(client.generate("hello"), "eos")
        assert client.stream("hello").collect().text == "abcde"
        with pytest.raises(InvalidArgument):  # past the key check, the server's own answers come through
            client.generate("invalid")
        client.wait_ready(timeout=5)
    monkeypatch.setenv("SPECDEC_API_KEY", KEY)  # the key from the environment when none is passed
    with Client(server.target, timeout=10, tls_ca=pki.ca) as client:
        assert client.generate("hello").text == "abcde"

    async def scenario():
        async with AsyncClient(server.target, timeout=10, tls_ca=pki.ca, api_key=KEY) as client:
            check_result(await client.generate("hello"), "eos")
            chunks = [chunk.text async for chunk in client.stream("hello")]
            assert chunks == ["ab", "c", "de"]
        async with AsyncClient(server.target, timeout=5, tls_ca=pki.ca, api_key=WRONG_KEY) as refused:
            with pytest.raises(Unauthenticated, match="invalid API key"):
                await refused.generate("hello")

    asyncio.run(scenario())
    assert server.servicer.calls["hello"] == 5

    monkeypatch.delenv("SPECDEC_API_KEY")
    code = cli.main(["generate", "hello", "--target", server.target, "--tls-ca", pki.ca, "--api-key", KEY,
                     "--no-stats"])
    assert (code, capsys.readouterr().out) == (0, "abcde\n")
    code = cli.main(["generate", "hello", "--target", server.target, "--tls-ca", pki.ca, "--api-key", WRONG_KEY])
    err = capsys.readouterr().err
    assert code == 2 and "invalid API key" in err and "--api-key" in err
    assert WRONG_KEY not in err and "Traceback" not in err
    code = cli.main(["generate", "hello", "--target", server.target, "--tls-ca", "/nonexistent/ca.pem"])
    err = capsys.readouterr().err
    assert code == 2 and "TLS CA file /nonexistent/ca.pem: no such file" in err


def test_a_refused_key_raises_unauthenticated_and_is_not_retried(make_server, monkeypatch):
    server = make_server(keys=(KEY,))
    monkeypatch.delenv("SPECDEC_API_KEY", raising=False)
    with Client(server.target, retries=3, backoff_s=0.01, timeout=10, api_key=WRONG_KEY) as client:
        with pytest.raises(Unauthenticated) as unary:
            client.generate("hello")
        with pytest.raises(Unauthenticated) as streamed:
            list(client.stream("hello"))
    with Client(server.target, retries=3, backoff_s=0.01, timeout=10) as keyless:
        with pytest.raises(Unauthenticated, match="missing API key"):
            keyless.generate("hello")
    assert unary.value.code == grpc.StatusCode.UNAUTHENTICATED and str(unary.value) == "invalid API key"
    assert WRONG_KEY not in str(streamed.value)
    assert server.counter.calls == {"GenerateUnary": 2, "Generate": 1}  # one attempt each, no retry
    assert server.servicer.calls["hello"] == 0


def test_sdk_tls_arguments_are_checked_when_the_client_is_made(pki, tmp_path):
    with pytest.raises(ValueError, match="TLS CA file .*/none.pem: no such file"):
        Client("127.0.0.1:1", tls_ca=str(tmp_path / "none.pem"))
    with pytest.raises(ValueError, match="needs its key"):
        AsyncClient("127.0.0.1:1", tls_ca=pki.ca, tls_cert=pki.client_cert)
    with pytest.raises(ValueError, match="not both"):
        Client("127.0.0.1:1", tls_ca=pki.ca, root_certificates=b"-----BEGIN CERTIFICATE-----")
    with pytest.raises(ValueError, match="printable ASCII"):
        Client("127.0.0.1:1", api_key="key with spaces")


# ---------------------------------------------------------------------------------------------------------
# the real services: verifier and proposer on mutual TLS, the scheduler on TLS with API keys


def test_the_whole_stack_over_tls_with_mutual_tls_inside_and_api_keys_outside(pki, tmp_path, monkeypatch):
    from proposer_svc.ngram import NgramProposer
    from proposer_svc.server import start_server as start_proposer
    from scheduler_svc.config import ProposerAddress, SchedulerConfig
    from scheduler_svc.server import start_server as start_scheduler
    from specdec.testing import make_tiny_checkpoint
    from test_scheduler_fakes import TOKENIZER
    from verifier_svc.core import VerifierCore
    from verifier_svc.server import start_server as start_verifier

    monkeypatch.delenv("SPECDEC_API_KEY", raising=False)
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny", "llama")
    keys = tmp_path / "keys"
    keys.write_text(f"# clients\n{KEY}\n")
    internal = ServerTLS(pki.server_cert, pki.server_key, pki.ca)  # only holders of a ca-signed cert get in

    async def scenario():
        core = VerifierCore.from_checkpoint(checkpoint, device="cpu", dtype="float32", max_slots=4,
                                            max_seq_len=64, max_batch_size=4)
        verifier = await start_verifier(core, "127.0.0.1", 0, tls=internal)
        proposer = await start_proposer(NgramProposer(min_n=1, max_n=3, max_budget=4, vocab_size=97),
                                        "127.0.0.1", 0, tls=internal)
        config = SchedulerConfig(
            verifier=f"127.0.0.1:{verifier.port}", proposers=(ProposerAddress("ngram", f"127.0.0.1:{proposer.port}"),),
            port=0, policy="fixed", k=2, profile_s=0.0, grace_s=0.0,
            tls_cert=pki.server_cert, tls_key=pki.server_key, api_keys_file=str(keys),
            internal_tls_ca=pki.ca, internal_tls_cert=pki.client_cert, internal_tls_key=pki.client_key)
        scheduler = await start_scheduler(config, TOKENIZER)
        try:
            await asyncio.wait_for(scheduler.scheduler.ready.wait(), 20)
            target = f"127.0.0.1:{scheduler.port}"
            async with AsyncClient(target, timeout=20, tls_ca=pki.ca, api_key=KEY) as client:
                await client.wait_ready(timeout=10)
                result = await client.generate([5, 6, 7, 5, 6, 7, 5, 6], max_tokens=8, ignore_eos=True)
            assert len(result.token_ids) == 8 and result.finish_reason == "length"
            # The proposer answered over mutual TLS (a failing proposer would only turn speculation off).
            assert result.stats.proposers["ngram"].steps > 0
            assert scheduler.scheduler.proposers["ngram"].faults == 0
            async with AsyncClient(target, timeout=5, retries=0, tls_ca=pki.ca) as keyless:
                with pytest.raises(Unauthenticated):
                    await keyless.generate("hello")
            async with AsyncClient(target, timeout=5, retries=0, api_key=KEY) as plaintext:
                with pytest.raises(Unavailable):
                    await plaintext.generate("hello")
        finally:
            await scheduler.stop(0)
            await proposer.stop(0)
            await verifier.stop(0)

    asyncio.run(asyncio.wait_for(scenario(), 90))
