"""Guard tables and kernels on torch tensors: verdicts, bad input, no copies."""
import pytest
import torch

import tezzeret

SHAPE = (8, 32, 16, 16)


def test_guard_check_matches_and_names_mismatches(forge):
    with forge.guard_table() as table:
        x = torch.randn(SHAPE)
        verdict = table.check("BP016", x)
        assert verdict.ok and len(verdict.checksum) == 64
        assert table.matches("BP016", torch.randn(3, 32, 16, 16)), "dynamic batch"
        wrong = table.check("BP016", torch.randn(8, 32, 16, 15))
        assert (wrong.result, wrong.input, wrong.dimension, wrong.expected, wrong.actual) == ("shape", 0, 3, 16, 15)
        assert table.check("BP016", x.double()).result == "dtype"
        assert table.check("BP016", x.permute(0, 2, 3, 1)).result in ("stride", "shape")
        assert table.check("BP016").result == "input_count"
        assert table.check("BP404", x).result == "unknown_blueprint"
        assert tezzeret.guard_check(table, "BP016", [x]).ok
        entry = table.lookup("BP016")
        assert entry.inputs[0].shape == SHAPE and entry.inputs[0].dtype == "float32"
        with pytest.raises(tezzeret.NotFoundError):
            table.lookup("BP404")
        with pytest.raises(tezzeret.InvalidArgumentError, match="not a torch.Tensor"):
            table.check("BP016", [1, 2, 3])
        with pytest.raises(tezzeret.InvalidArgumentError, match="dtype"):
            table.check("BP016", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(tezzeret.InvalidArgumentError, match="closed"):
        table.check("BP016", x)


def test_a_guard_table_opens_from_its_path(forge):
    import os

    with tezzeret.GuardTable(os.path.join(forge.state_dir, "guards.tbl")) as table:
        assert table.check("BP016", torch.randn(SHAPE)).ok


def test_kernel_runs_on_tensors_like_the_artifact_loaded_by_torch(forge):
    artifact = next(a for a in forge.catalog() if a["blueprint_id"] == "BP016")["artifact_path"]
    reference = torch.jit.load(artifact)
    x = torch.randn(SHAPE)
    with forge.load_kernel("BP016") as kernel:
        y = kernel.run(x)
        with torch.no_grad():
            assert torch.allclose(y, reference(x), atol=1e-5)
        assert kernel(torch.randn(2, 32, 16, 16)).shape == (2, 32, 16, 16)


def test_inputs_are_read_in_place_and_the_result_is_not_copied(forge):
    with forge.load_kernel("BP001") as identity:
        x = torch.randn(8, 32)
        y = identity.run(x)
        # Identity: the forge's result is a tensor of its own (not the input's storage) ...
        assert torch.equal(x, y)
        # ... and torch holds the library's memory directly: a write through
        # one view shows in another made from the same DLPack capsule.
        z = torch.from_dlpack(y)
        z[0, 0] = 1234.0
        assert y[0, 0].item() == 1234.0 and y.data_ptr() == z.data_ptr()
        # The input was read where it lies: changing it after the run changes nothing.
        x.add_(1.0)
        assert not torch.equal(x, y)


def test_the_views_handed_to_the_library_point_at_the_tensors_own_memory():
    from tezzeret._tensors import DLViews

    x = torch.randn(8, 32, 16, 16)
    s = torch.randn(4, 6).t()  # non-contiguous: described as it is, never made contiguous
    views = DLViews()
    views.fill([x, s])
    assert views.array[0].data == x.data_ptr() and views.array[1].data == s.data_ptr()
    assert [views.array[1].strides[d] for d in range(2)] == list(s.stride())


def test_bad_tensors_are_refused_naming_the_problem(forge):
    with forge.load_kernel("BP016") as kernel:
        with pytest.raises(tezzeret.InvalidArgumentError, match="dimension 3 is 15, expected 16"):
            kernel.run(torch.randn(8, 32, 16, 15))
        with pytest.raises(tezzeret.InvalidArgumentError, match="dtype"):
            kernel.run(torch.randn(SHAPE, dtype=torch.float64))
        with pytest.raises(tezzeret.InvalidArgumentError, match="not a torch.Tensor"):
            kernel.run("tensor")
        with pytest.raises(tezzeret.InvalidArgumentError, match="layout"):
            kernel.run(torch.randn(SHAPE).to_sparse())

        class Impostor:
            """Looks like a CPU float tensor, pointing at memory it does not own."""

            dtype, is_cpu, shape = torch.float32, True, torch.Size(SHAPE)

            def stride(self):
                return torch.empty(SHAPE).stride()

            def data_ptr(self):
                return 8

        with pytest.raises(tezzeret.InvalidArgumentError, match="not a torch.Tensor"):
            kernel.run(Impostor())
        if hasattr(torch, "device") and torch.device("meta"):
            with pytest.raises(tezzeret.InvalidArgumentError, match="device"):
                kernel.run(torch.empty(SHAPE, device="meta"))
    with pytest.raises(tezzeret.InvalidArgumentError, match="closed"):
        kernel.run(torch.randn(SHAPE))


def test_a_kernel_outlives_its_forge(compiled_state):
    with tezzeret.Forge(compiled_state, device="cpu", telemetry_interval=0) as forge:
        kernel = forge.load_kernel("BP016")
    y = kernel.run(torch.randn(SHAPE))
    assert y.shape == SHAPE
    kernel.close()


def test_the_compiled_hot_path_is_built_in_and_agrees_with_the_ctypes_path(forge, monkeypatch):
    import tezzeret.kernel

    assert tezzeret.kernel.FAST_PATH, "the wheel carries the compiled hot path"
    with forge.load_kernel("BP016") as kernel:
        x = torch.randn(SHAPE)
        fast = kernel.run(x)
        # Strides are read, not assumed (a strided view is refused, naming
        # them), and a guard mismatch is raised, by both paths alike.
        strided = torch.randn(SHAPE[0], SHAPE[1], SHAPE[2], 2 * SHAPE[3])[..., ::2]
        refusals = []
        for path in ("compiled", "ctypes"):
            if path == "ctypes":
                monkeypatch.setattr(tezzeret.kernel, "_fast_run", None)
            for bad in (strided, torch.randn(8, 31, 16, 16)):
                with pytest.raises(tezzeret.InvalidArgumentError) as refused:
                    kernel.run(bad)
                refusals.append(str(refused.value))
        assert "stride" in refusals[0] and refusals[:2] == refusals[2:], refusals
        assert torch.equal(fast, kernel.run(x))
        # A tensor subclass is not described in C (it could override what is
        # read); the ctypes path runs it.
        monkeypatch.undo()
        assert torch.equal(fast, kernel.run(torch.nn.Parameter(x, requires_grad=False)))
    with pytest.raises(tezzeret.InvalidArgumentError, match="closed"):
        kernel.run(x)
