"""The baseline users would build instead of cascade-server: a Triton-only cascade.

One Python-backend model behind Triton's C++ HTTP front end (KServe v2 JSON, the same base64
PNG string the gateway takes). It takes the dynamic batch of requests, decodes every image with
the gateway's own preprocessing, runs the student once on the batch with onnxruntime in-process,
and sends all delegated items to the teacher model in one BLS call. The threshold comes from the
request's `threshold` parameter (else the config's). Parameters: `student_onnx` (absolute path),
`manifest` (the bundle's manifest.json), `teacher_model`, `threshold`.
"""

import base64
import json

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from cascade_server.bundle import Manifest
from cascade_server.policy import softmax, top2_margin
from cascade_server.preprocess import ImagePreprocessor


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        with open(params["manifest"]) as fh:
            self.manifest = Manifest.model_validate_json(fh.read())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.student = ort.InferenceSession(
            params["student_onnx"], opts, providers=["CPUExecutionProvider"]
        )
        self.preprocess = ImagePreprocessor(self.manifest.preprocess, 4096 * 4096)
        self.teacher = params["teacher_model"]
        self.threshold = float(params.get("threshold", self.manifest.default_threshold))

    def execute(self, requests):
        blobs, sizes, thresholds = [], [], []
        for r in requests:
            items = pb_utils.get_input_tensor_by_name(r, "image").as_numpy().reshape(-1)
            blobs += [base64.b64decode(x) for x in items]
            sizes.append(len(items))
            asked = json.loads(r.parameters() or "{}").get("threshold", self.threshold)
            thresholds += [float(asked)] * len(items)
        x = self.preprocess(blobs)
        (logits,) = self.student.run(None, {self.manifest.student_input: x})
        probs = softmax(logits)
        margins = top2_margin(probs)
        delegate = margins < np.asarray(thresholds)
        by_teacher = np.zeros(len(blobs), dtype=bool)
        idx = np.flatnonzero(delegate)
        if idx.size:
            request = pb_utils.InferenceRequest(
                model_name=self.teacher,
                requested_output_names=["logits"],
                inputs=[pb_utils.Tensor(self.manifest.teacher.input_name, x[idx])],
            )
            response = request.exec()
            if not response.has_error():
                teacher = pb_utils.get_output_tensor_by_name(response, "logits").as_numpy()
                probs[idx] = softmax(teacher)
                by_teacher[idx] = True
        class_id = probs.argmax(axis=1).astype(np.int64)
        responses, start = [], 0
        for size in sizes:
            rows = slice(start, start + size)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("class_id", class_id[rows].reshape(-1, 1)),
                        pb_utils.Tensor("margin", margins[rows].astype(np.float32).reshape(-1, 1)),
                        pb_utils.Tensor("by_teacher", by_teacher[rows].reshape(-1, 1)),
                    ]
                )
            )
            start += size
        return responses
