"""Without the compiled extensions the package imports, warns once and runs on `reference`."""
import os
import subprocess
import sys
import textwrap


def test_imports_and_runs_without_the_extension():
    script = textwrap.dedent("""
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name in ("fsam_kernels._C", "fsam_kernels._sim"):
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch
        import fsam_kernels
        assert not fsam_kernels.EXTENSION_LOADED
        assert fsam_kernels.available_backends() == ["reference"], fsam_kernels.available_backends()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = torch.nn.Linear(8, 4)
            opt = fsam_kernels.FSAM(model.named_parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5)
            opt2 = fsam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
        assert sum("not available" in str(w.message) for w in caught) == 1, [str(w.message) for w in caught]
        assert opt.backend == "reference"
        model(torch.randn(3, 8)).sum().backward()
        opt.first_step(zero_grad=True)
        model(torch.randn(3, 8)).sum().backward()
        opt.second_step()
        try:
            fsam_kernels.SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="cpu")
        except RuntimeError as e:
            assert "not available" in str(e)
        else:
            raise AssertionError("backend='cpu' without the extension must raise")
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
