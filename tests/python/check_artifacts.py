"""Loads every artifact of a manifest with Python's torch.jit.load (stock
PyTorch), feeds the recorded inputs, compares with the recorded eager
outputs, checks the inputs against the guard spec, and recomputes the
guard digest as sha256(json.dumps(spec, sort_keys=True)).

usage: python check_artifacts.py MANIFEST.json
Prints "N passed, M failed"; exits non-zero on any failure."""
import hashlib
import json
import sys

import numpy as np
import torch


def load_tensor(entry):
    data = np.fromfile(entry["path"], dtype="<f4").reshape(entry["shape"])
    return torch.from_numpy(data.copy())


def check(record):
    spec = record["guard_spec"]
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    if digest != record["guard_digest"]:
        return f"guard digest {digest} != recorded {record['guard_digest']}"
    inputs = [load_tensor(e) for e in record["inputs"]]
    for guard, tensor in zip(spec, inputs):
        if list(tensor.shape) != guard["shape"] or list(tensor.stride()) != guard["stride"]:
            return f"input {guard['index']} does not match its guard {guard}"
        if str(tensor.dtype).removeprefix("torch.") != guard["dtype"]:
            return f"input {guard['index']} dtype {tensor.dtype} != guard {guard['dtype']}"
    module = torch.jit.load(record["artifact_path"])
    module.eval()
    with torch.no_grad():
        output = module(*inputs)
    expected = load_tensor(record["expected"])
    if output.shape != expected.shape or not torch.allclose(output, expected, rtol=1e-4, atol=1e-5):
        diff = (output - expected).abs().max().item() if output.shape == expected.shape else "shape"
        return f"output differs from the eager reference (max diff {diff})"
    return None


def main():
    records = json.load(open(sys.argv[1]))
    failed = 0
    for record in records:
        try:
            problem = check(record)
        except Exception as error:  # a load or run failure is a test failure
            problem = f"{type(error).__name__}: {error}"
        if problem:
            failed += 1
            print(f"{record['blueprint_id']} ({record['strategy']}): {problem}", file=sys.stderr)
    print(f"{len(records) - failed} passed, {failed} failed")
    sys.exit(1 if failed or not records else 0)


if __name__ == "__main__":
    main()
