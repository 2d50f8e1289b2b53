"""Training never imports the gateway's web stack: a training environment needs no FastAPI."""

import subprocess
import sys
import textwrap


def test_training_imports_with_fastapi_blocked():
    code = textwrap.dedent("""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("fastapi", "starlette", "uvicorn", "opentelemetry"):
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Block())
        import cascade_server.train.cli, cascade_server.train.stages
        import cascade_server.train.methods, cascade_server.train.demo
        import cascade_server.preprocess, cascade_server.errors
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("fastapi", "starlette")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
