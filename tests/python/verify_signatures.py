"""Checks Tezzeret's artifact signatures with an independent ed25519
implementation (the `cryptography` package). The manifest's canonical bytes
are rebuilt here from the artifact record, as
json.dumps(manifest, sort_keys=True, separators=(",", ":")).

usage: python verify_signatures.py RECORDS.json
RECORDS.json: a list of artifact records (as in manifests/*.json).
Prints "N passed, M failed"; exits non-zero on any failure."""
import json
import sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def manifest(record):
    return {
        "artifact_format_version": record["format_version"],
        "artifact_sha256": record["checksum"],
        "blueprint_id": record["blueprint_id"],
        "device": record["device"],
        "guard_digest": record["guard_digest"],
        "revision": record["revision"],
        "strategy": record["strategy"],
        "tezzeret_version": record["tezzeret_version"],
        "torch_version": record["torch_version"],
        "variant": record["variant"],
    }


def main():
    records = json.load(open(sys.argv[1]))
    failed = 0
    for record in records:
        signed = record.get("signature")
        try:
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(signed["public_key"]))
            message = json.dumps(manifest(record), sort_keys=True, separators=(",", ":")).encode()
            key.verify(bytes.fromhex(signed["signature"]), message)
        except Exception as error:
            failed += 1
            print(f"{record['blueprint_id']}: {type(error).__name__} {error}", file=sys.stderr)
    print(f"{len(records) - failed} passed, {failed} failed")
    sys.exit(1 if failed or not records else 0)


if __name__ == "__main__":
    main()
