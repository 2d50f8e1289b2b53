"""The gateway runs on ONNX Runtime alone: serving never imports torch."""

import subprocess
import sys
import textwrap


def test_serving_a_request_does_not_import_torch(demo, text_demo, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from fastapi.testclient import TestClient
        from cascade_server.gateway.app import create_app
        from cascade_server.settings import Settings
        from tests.integration.conftest import FakeTeacher
        from tests.conftest import png_bytes, b64
        import numpy as np
        settings = Settings(bundles=[{str(demo.bundle)!r}, {str(text_demo.bundle)!r}],
                            state_dir={str(tmp_path)!r})
        app = create_app(settings, teacher_factory=lambda s, b: FakeTeacher())
        with TestClient(app) as client:
            img = np.zeros((8, 8, 1), np.uint8)
            assert client.post("/predict", json={{"image": b64(png_bytes(img))}}).is_success
            assert client.post("/predict", json={{"text": "my card was declined"}}).is_success
            assert client.get("/metrics").is_success
        import cascade_server.triton, cascade_server.serve
        print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
