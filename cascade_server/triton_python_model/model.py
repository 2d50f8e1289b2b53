"""Triton Python-backend model that runs an ONNX file with ONNX Runtime.

The bundled tritonserver (nvidia-pytriton) has no ONNX Runtime backend, so local runs and tests
serve the production `model.onnx` through this file; production Triton uses its native
`onnxruntime_onnx` platform on the same file. Parameters (config.pbtxt `parameters`):
`onnx_file` (default model.onnx), `intra_op_threads` (default 1), and `delay_ms` (default 0):
a fault-injection knob for reliability tests, a teacher that takes this long per batch.
"""

import json
import os
import time

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = os.path.join(
            args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx")
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.delay_s = float(params.get("delay_ms", "0")) / 1000

    def execute(self, requests):
        # The dynamic batcher hands over several requests at once: run them as one ORT batch.
        if self.delay_s:
            time.sleep(self.delay_s)
        try:
            per_request = [
                [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs]
                for r in requests
            ]
            sizes = [arrays[0].shape[0] for arrays in per_request]
            feeds = {
                name: np.concatenate([arrays[j] for arrays in per_request])
                for j, name in enumerate(self.inputs)
            }
            results = self.session.run(self.outputs, feeds)
        except Exception as exc:  # answer every request with the error rather than crash
            error = pb_utils.TritonError(f"onnxruntime failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses = []
        start = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(out[start : start + size]))
                for name, out in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self):
        self.session = None
