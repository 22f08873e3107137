"""Certificates for the local control plane: a CA, the API server's serving certificate,
client certificates for the admin and each component, and the service-account key pair.

Everything is generated fresh per cluster (ECDSA P-256, valid for a year) and written
under the cluster's state directory; nothing here is meant for production.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class CertPair:
    """Paths of a PEM certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class ClusterPKI:
    """All the credential files one local cluster needs."""

    ca: CertPair
    apiserver: CertPair
    admin: CertPair
    controller_manager: CertPair
    scheduler: CertPair
    sa_private_key: Path
    sa_public_key: Path
    #: The aggregation layer's own CA (front proxy) and the API server's client certificate
    #: from it: what the API server presents to aggregated API servers (Kueue's visibility
    #: API), which trust the X-Remote-* headers only from a certificate of this CA.
    front_proxy_ca: CertPair
    front_proxy_client: CertPair


#: The front proxy client's name; the API server's --requestheader-allowed-names.
FRONT_PROXY_CLIENT = "front-proxy-client"


def _write_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _issue(
    *,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    is_ca: bool = False,
    server_names: tuple[str, ...] = (),
    client: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if server_names:
        alt: list[x509.GeneralName] = []
        for name in server_names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _save(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, d: Path, stem: str) -> CertPair:
    pair = CertPair(cert=d / f"{stem}.crt", key=d / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pair.key)
    return pair


def generate_pki(
    directory: Path, service_ip: str = "10.96.0.1", extra_server_names: tuple[str, ...] = ()
) -> ClusterPKI:
    """Create a fresh CA and every certificate and key the cluster needs in `directory`;
    `extra_server_names` are more names of the API server (a real node's bridge address)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("kubetune-dev-ca")
    ca_cert = _issue(subject=ca_name, key=ca_key, issuer=ca_name, issuer_key=ca_key, is_ca=True)
    ca = _save(ca_cert, ca_key, directory, "ca")

    def client(stem: str, cn: str, org: str | None = None) -> CertPair:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(
            subject=_name(cn, org), key=key, issuer=ca_name, issuer_key=ca_key, client=True
        )
        return _save(cert, key, directory, stem)

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_names = (
        "127.0.0.1",
        "localhost",
        service_ip,
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        *extra_server_names,
    )
    server_cert = _issue(
        subject=_name("kube-apiserver"),
        key=server_key,
        issuer=ca_name,
        issuer_key=ca_key,
        server_names=server_names,
    )
    apiserver = _save(server_cert, server_key, directory, "apiserver")

    # The service-account signing key must be RSA or ECDSA; RSA is the most widely accepted.
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sa_private = directory / "sa.key"
    _write_key(sa_key, sa_private)
    sa_public = directory / "sa.pub"
    sa_public.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    # A CA of its own, as kubeadm does: a client certificate of the cluster CA must not be
    # able to assert any user through the X-Remote-User header.
    fp_key = ec.generate_private_key(ec.SECP256R1())
    fp_name = _name("kubetune-dev-front-proxy-ca")
    fp_cert = _issue(subject=fp_name, key=fp_key, issuer=fp_name, issuer_key=fp_key, is_ca=True)
    front_proxy_ca = _save(fp_cert, fp_key, directory, "front-proxy-ca")
    fpc_key = ec.generate_private_key(ec.SECP256R1())
    fpc_cert = _issue(
        subject=_name(FRONT_PROXY_CLIENT),
        key=fpc_key,
        issuer=fp_name,
        issuer_key=fp_key,
        client=True,
    )
    front_proxy_client = _save(fpc_cert, fpc_key, directory, "front-proxy-client")
    return ClusterPKI(
        ca=ca,
        apiserver=apiserver,
        # system:masters is the bootstrap superuser group; admin is what tests and kubectl use.
        admin=client("admin", "kubetune-admin", "system:masters"),
        # The built-in RBAC bootstrap roles bind these exact user names.
        controller_manager=client("controller-manager", "system:kube-controller-manager"),
        scheduler=client("scheduler", "system:kube-scheduler"),
        sa_private_key=sa_private,
        sa_public_key=sa_public,
        front_proxy_ca=front_proxy_ca,
        front_proxy_client=front_proxy_client,
    )


def _load_ca(ca: CertPair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The cluster's CA certificate and key, as `generate_pki` wrote them."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{ca.key}: the dev cluster's CA key is expected to be an EC key")
    return ca_cert, ca_key


@dataclass(frozen=True)
class NodePKI:
    """A real node's credentials: the kubelet's client certificate (the Node authorizer's
    `system:node:<name>` in `system:nodes`) and its serving certificate for the node IP."""

    client: CertPair
    serving: CertPair


def generate_node_pki(directory: Path, ca: CertPair, node_name: str, node_ip: str) -> NodePKI:
    """Issue the kubelet's certificates from the cluster's CA (written by `generate_pki`)."""
    ca_cert, ca_key = _load_ca(ca)
    directory.mkdir(parents=True, exist_ok=True)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _issue(
        subject=_name(f"system:node:{node_name}", "system:nodes"),
        key=client_key,
        issuer=ca_cert.subject,
        issuer_key=ca_key,
        client=True,
    )
    serving_key = ec.generate_private_key(ec.SECP256R1())
    serving_cert = _issue(
        subject=_name(node_name),
        key=serving_key,
        issuer=ca_cert.subject,
        issuer_key=ca_key,
        server_names=(node_ip, node_name),
    )
    return NodePKI(
        client=_save(client_cert, client_key, directory, "kubelet-client"),
        serving=_save(serving_cert, serving_key, directory, "kubelet-serving"),
    )


def issue_serving_cert(
    ca: CertPair, directory: Path, common_name: str, names: tuple[str, ...] = ("127.0.0.1",)
) -> CertPair:
    """A serving certificate signed by the cluster's CA, saved as `tls.crt`/`tls.key` in
    `directory` (the file names controller-runtime's webhook server reads)."""
    ca_cert, ca_key = _load_ca(ca)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(
        subject=_name(common_name),
        key=key,
        issuer=ca_cert.subject,
        issuer_key=ca_key,
        server_names=names,
    )
    return _save(cert, key, directory, "tls")
