"""The broker link's security against a real mosquitto with TLS client certificates and
passwords (CA and certificates made here with ``cryptography``), and bad input at start-up:
one line, exit code 2, or (an unreachable broker) a log line and retries."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import zmq
from uplink_helpers import Broker, Consumer, Uplink, need_mosquitto, wait_until

from helpers import run_cli

pytestmark = pytest.mark.integration


def make_pki(d: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
        k, c = d / f"{stem}.key", d / f"{stem}.crt"
        k.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return c, k

    def issue(cn: str, issuer_key, issuer_name, ca: bool = False, server: bool = False):  # type: ignore[no-untyped-def]
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer_name or name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        return key, b.sign(issuer_key or key, hashes.SHA256())

    ca_key, ca = issue("test-ca", None, None, ca=True)
    paths = {"ca": write("ca", ca_key, ca)[0]}
    for stem, server in (("server", True), ("client", False)):
        key, cert = issue(stem, ca_key, ca.subject, server=server)
        paths[f"{stem}_cert"], paths[f"{stem}_key"] = write(stem, key, cert)
    rogue_key, rogue = issue("rogue", None, None)  # self-signed: not from the fleet's CA
    paths["rogue_cert"], paths["rogue_key"] = write("rogue", rogue_key, rogue)
    return paths


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    need_mosquitto()
    d = tmp_path_factory.mktemp("tls")
    pki = make_pki(d)
    passwd = d / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "uplink", "right-password"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "backend", "backend-password"], check=True)
    from helpers import free_port

    port = free_port()
    broker = Broker(
        d / "broker",
        port=port,
        extra=(
            f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\ncafile {pki['ca']}\n"
            f"certfile {pki['server_cert']}\nkeyfile {pki['server_key']}\nrequire_certificate true\n"
        ),
    ).start()
    yield broker, pki
    broker.stop()


def uplink_with(tmp: Path, broker: Broker, pki: dict, name: str, password: str, cert: str = "client") -> Uplink:
    return Uplink(
        tmp,
        [
            "--endpoint",
            f"ipc://{tmp}/pub-{name}.sock",
            "--mqtt",
            f"mqtts://127.0.0.1:{broker.port}",
            "--journal",
            str(tmp / f"j-{name}"),
            "--vehicle",
            "car-tls",
        ],
        env={
            "RETROFIT_UPLINK_MQTT__USERNAME": "uplink",
            "RETROFIT_UPLINK_MQTT__PASSWORD": password,
            "RETROFIT_UPLINK_MQTT__CA_FILE": str(pki["ca"]),
            "RETROFIT_UPLINK_MQTT__CERT_FILE": str(pki[f"{cert}_cert"]),
            "RETROFIT_UPLINK_MQTT__KEY_FILE": str(pki[f"{cert}_key"]),
        },
        name=name,
    )


def test_an_authorised_uplink_delivers_and_a_wrong_password_or_foreign_certificate_is_refused(
    secure_broker, tmp_path: Path
):  # type: ignore[no-untyped-def]
    broker, pki = secure_broker
    import paho.mqtt.client as paho

    consumer = Consumer(
        broker.port,
        client_id="backend-tls",
        auth=("backend", "backend-password"),
        tls={"ca_certs": str(pki["ca"]), "certfile": str(pki["client_cert"]), "keyfile": str(pki["client_key"])},
    ).start()
    wait_until(lambda: consumer.client.is_connected(), 15, "backend connected over TLS")

    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"ipc://{tmp_path}/pub-good.sock")
    good = uplink_with(tmp_path, broker, pki, "good", "right-password").start()
    bad = uplink_with(tmp_path, broker, pki, "bad", "wrong-password").start()
    rogue = uplink_with(tmp_path, broker, pki, "rogue", "right-password", cert="rogue").start()
    for u in (good, bad, rogue):
        u.wait_ready()
    wait_until(lambda: good.metric("retrofit_uplink_broker_connected") == 1, 15, "authorised uplink connected")
    for seq in range(20):
        body = {
            "topic": "events",
            "schema_version": 2,
            "run_id": "r",
            "vehicle": "car-tls",
            "seq": seq,
            "camera": "front",
            "frame_id": seq,
            "at": "x",
            "model": "m",
            "event": "tag_on",
            "tag": {"group": "g", "label": "l", "score": 1.0},
        }
        pub.send_multipart([b"events", json.dumps(body).encode()])
        time.sleep(0.05)
    wait_until(lambda: len(consumer.bodies("/events")) >= 15, 15, "events through TLS")
    time.sleep(2)
    assert bad.metric("retrofit_uplink_broker_connected") == 0
    assert rogue.metric("retrofit_uplink_broker_connected") == 0
    assert any(e["event"] in ("mqtt_refused", "mqtt_unreachable") for e in bad.events())
    # A plain client with no certificate at all does not get through the TLS handshake.
    plain = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    plain.tls_set(ca_certs=str(pki["ca"]))
    plain.username_pw_set("uplink", "right-password")
    accepted = []
    plain.on_connect = lambda c, u, f, reason, p: accepted.append(not reason.is_failure)
    try:
        plain.connect("127.0.0.1", broker.port)
        for _ in range(10):
            plain.loop(0.2)
    except (ssl.SSLError, OSError):
        pass
    assert not any(accepted), "no CONNACK for a client without a certificate"
    for u in (good, bad, rogue):
        assert u.stop() == 0
    consumer.stop()
    pub.close(0)


@pytest.mark.parametrize(
    "args, env, says",
    [
        (["--journal", "/proc/uplink-journal"], {}, "journal.directory: cannot use /proc/uplink-journal"),
        (
            ["--mqtt", "mqtts://127.0.0.1:8883"],
            {"RETROFIT_UPLINK_MQTT__CA_FILE": "/nonexistent/ca.pem"},
            "mqtt.ca_file: cannot use /nonexistent/ca.pem",
        ),
        (
            ["--mqtt", "mqtts://127.0.0.1:8883"],
            {"RETROFIT_UPLINK_MQTT__CERT_FILE": "/etc/hostname", "RETROFIT_UPLINK_MQTT__KEY_FILE": "/etc/hostname"},
            "mqtt.cert_file/key_file: cannot use /etc/hostname",
        ),
        ([], {"RETROFIT_UPLINK_MQTT__TOPIC_PREFIX": "fleet/#"}, "mqtt.topic_prefix"),
        (["--mqtt", "http://broker:1883"], {}, "mqtt.url"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args: list[str], env: dict[str, str], says: str, tmp_path: Path):
    base = ["--journal", str(tmp_path / "j"), "--metrics-address", "127.0.0.1:0", "--log-format", "json"]
    r = run_cli("uplink", *base, *args, env=env, timeout=60)
    errors = [l for l in r.stderr.splitlines() if not l.startswith("{")]
    assert r.returncode == 2 and len(errors) == 1 and errors[0].startswith("retrofit-agent uplink: error: "), r.stderr
    assert says in errors[0], errors[0]
    assert "Traceback" not in r.stderr


def test_an_unreachable_broker_at_start_up_is_logged_and_retried_not_fatal(tmp_path: Path):
    from helpers import free_port

    port = free_port()
    u = Uplink(
        tmp_path,
        [
            "--endpoint",
            f"ipc://{tmp_path}/x.sock",
            "--mqtt",
            f"mqtt://127.0.0.1:{port}",
            "--journal",
            str(tmp_path / "j"),
        ],
        env={"RETROFIT_UPLINK_MQTT__BACKOFF_MAX_S": "1"},
    ).start()
    u.wait_ready()
    wait_until(lambda: any(e["event"] == "mqtt_unreachable" for e in u.events()), 15, "unreachable logged")
    broker = Broker(tmp_path / "broker", port=port).start()
    try:
        wait_until(lambda: u.metric("retrofit_uplink_broker_connected") == 1, 30, "connected once the broker is up")
        assert u.proc is not None and u.proc.poll() is None
    finally:
        assert u.stop() == 0
        broker.stop()
