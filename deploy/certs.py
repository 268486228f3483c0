"""TLS for the SuperLink: a private CA and the SuperLink certificate it signs (EC P-384).

Every value is checked and every key and certificate made in memory before anything
touches the disk; the files are then written into a hidden temporary folder that is
renamed to ``--out``, so a refused or failed call leaves no folder behind. Modes are set
explicitly, whatever the umask: the folder (and any parent it needs) 0700, keys 0600,
certificates 0644.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgemri.core.io import private_folder, write_bytes
from edgemri.deploy.errors import DeployError

MAX_DAYS = 3650  # ten years; the CA outlives the SuperLink certificate by CA_EXTRA_DAYS
CA_EXTRA_DAYS = 365
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# The SuperLink's own ServerApp process (SuperExec) reaches it over loopback when it listens
# on 0.0.0.0, and verifies the certificate there too, so the certificate always names loopback.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
# File name -> (key in make_certs' result, file mode): private keys readable by the owner only; certificates
# are public (they are handed to every SuperNode), and their 0700 folder already keeps other users out of it.
FILES = {"ca.pem": ("ca_cert", 0o644), "ca.key": ("ca_key", 0o600),
         "server.pem": ("server_cert", 0o644), "server.key": ("server_key", 0o600)}


def _general_name(host: str) -> x509.GeneralName:
    """An IPAddress SAN for an IP address, a DNSName SAN for a host name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if re.fullmatch(r"[0-9.]+", host):
        raise DeployError(f"host {host!r} is not a valid IPv4 address")
    if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        raise DeployError(f"host {host!r} is neither an IP address nor a DNS name "
                          f"(letters, digits and '-' in dot-separated labels)")
    return x509.DNSName(host.rstrip(".").lower())


def parse_hosts(hosts: list[str]) -> list[x509.GeneralName]:
    """Validated subjectAltNames for the given hosts plus loopback, without duplicates."""
    if not hosts:
        raise DeployError("no hosts: name the SuperLink's address(es) as seen by the SuperNodes, "
                          "e.g. 192.0.2.10,superlink.example.org")
    names: list[x509.GeneralName] = []
    for host in [*hosts, *LOOPBACK_HOSTS]:
        if not host.strip():
            raise DeployError(f"empty host name in {hosts!r}")
        name = _general_name(host.strip())
        if name not in names:
            names.append(name)
    return names


def check_days(days: int) -> None:
    """The SuperLink certificate's validity: 1 to MAX_DAYS days."""
    if not 1 <= days <= MAX_DAYS:
        raise DeployError(f"--days {days}: certificate validity must be 1 to {MAX_DAYS} days "
                          f"(renew with a new certificate rather than issue one for decades)")


def _check_out(out: Path) -> None:
    """``out`` must be new or an empty folder: existing certificates and keys are never overwritten."""
    try:
        taken = out.exists() and (not out.is_dir() or any(out.iterdir()))
    except OSError as err:
        raise DeployError(f"cannot use --out {out}: {err.strerror or err}") from None
    if taken:
        raise DeployError(f"{out} already exists and is not an empty folder; choose another --out "
                          f"(existing certificates and keys are never overwritten)")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=not ca,
                         encipher_only=False, decipher_only=False)


def certificate_files(hosts: list[str], days: int) -> dict[str, bytes]:
    """The four PEM files (by file name in FILES), made in memory."""
    check_days(days)
    names = parse_hosts(hosts)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgemri"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "edgemri federation CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days + CA_EXTRA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    common_name = hosts[0].strip()[:64]  # X.509 caps CN at 64 characters; clients match the SANs anyway
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgemri"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    return {"ca.pem": ca_cert.public_bytes(pem), "ca.key": _pem_key(ca_key),
            "server.pem": server_cert.public_bytes(pem), "server.key": _pem_key(server_key)}


def make_certs(out: Path, hosts: list[str], *, days: int = 825) -> dict[str, Path]:
    """A private CA and a SuperLink certificate it signs, valid for every host (and loopback).

    Returns the paths ``ca_cert`` (give it to every SuperNode and to `flwr`), ``ca_key``
    (keep it offline: it can sign more certificates), ``server_cert`` and ``server_key``
    (for the SuperLink only). The folder is 0700, private keys 0600, whatever the umask.
    """
    out = Path(out)
    _check_out(out)
    files = certificate_files(hosts, days)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    try:
        private_folder(tmp, DeployError)  # becomes ``out``: anyone who could write in it could swap ca.pem
        for name, data in files.items():
            write_bytes(tmp / name, data, mode=FILES[name][1])
        os.rename(tmp, out)  # replaces an empty folder; refuses one that filled up meanwhile
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DeployError(f"cannot write certificates to {out}: {err.strerror or err}") from None
    return {FILES[name][0]: out / name for name in files}
