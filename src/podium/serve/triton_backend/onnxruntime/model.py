"""A Python-based Triton backend named `onnxruntime`: runs a model's `<version>/model.onnx` with ONNX Runtime.

The Triton server that PyPI's nvidia-pytriton bundles has only the python backend, not the C++
onnxruntime one. Triton resolves `platform: "onnxruntime_onnx"` (what `podium export --format
triton` writes) to the backend named `onnxruntime`; when no libtriton_onnxruntime.so exists it
looks for `<backend-directory>/onnxruntime/model.py` and runs that file in the python backend's
stub ("Python-based backends", triton-inference-server/python_backend README). So podium's
repository loads unchanged. `podium serve --engine triton` (podium.serve.triton) lays it out:

    BACKENDS/python/         libtriton_python.so, triton_python_backend_stub, ..._utils.py
    BACKENDS/onnxruntime/    model.py (this file)
    tritonserver --model-repository REPO --backend-directory BACKENDS ...

This file runs inside Triton's own virtual environment (numpy<2, onnxruntime), never inside
podium: it imports nothing from podium.

Honoured config.pbtxt parameters, as the C++ onnxruntime backend names them:
`intra_op_thread_count`, `inter_op_thread_count` (string values; default: ONNX Runtime's).
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _int_parameter(config: dict, key: str):
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return int(value) if value not in (None, "") else None


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        # A Python-based backend gets the model's folder and version, as the python backend does.
        path = os.path.join(args["model_repository"], args["model_version"],
                            config.get("default_model_filename") or "model.onnx")
        options = ort.SessionOptions()
        intra, inter = _int_parameter(config, "intra_op_thread_count"), _int_parameter(config, "inter_op_thread_count")
        if intra:
            options.intra_op_num_threads = intra
        # A CNN is one chain of operators: the parallelism that pays is inside each operator
        # (the same choice as podium.serve.export.load_onnx_session).
        options.inter_op_num_threads = inter or 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # ONNX Runtime's pool threads spin after each run by default: measured here, 7 ms of CPU
        # per single-image request of the digits model, about 20x the inference itself, taken
        # from Triton's front end and the other instances on the same cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args.get("model_instance_device_id", 0))}))
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        """One ONNX Runtime call for all requests the dynamic batcher hands over, split back per
        request. Triton has already checked names, dtypes, shapes and the batch limit against
        config.pbtxt; what fails here (a runtime error) fails these requests only."""
        try:
            per_request = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs]
                           for r in requests]
            sizes = [len(arrays[0]) for arrays in per_request]
            feeds = {name: np.concatenate([arrays[k] for arrays in per_request]) if len(requests) > 1
                     else per_request[0][k] for k, name in enumerate(self.inputs)}
            results = self.session.run(self.outputs, feeds)
        except Exception as err:  # noqa: BLE001 - sent to the clients as their error
            error = pb_utils.TritonError(f"onnxruntime: {err}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(result[start:start + size]))
                       for name, result in zip(self.outputs, results)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self):
        self.session = None
