"""Triton Python-backend model over BlipRuntime: copied as `<model>/1/model.py` by
`blip-serve --write-triton-repo`; the bundle sits beside it in `1/bundle`, the task is the
config's `task` parameter. Tensors: see blip_serve/triton.py.

Triton's dynamic batcher hands `execute` the requests that arrived together; they run through
blip_serve.batching.run_calls, the same grouping by task and options the Ray Serve replicas use.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from blip_runtime import BlipRuntime
from blip_serve.batching import Failed, run_calls
from blip_serve.inputs import Call, Limits, RequestError, open_image, parse_options

# task -> (the text input's name or None, output name, output dtype)
_IO = {
    "caption": ("PROMPT", "TEXT", None),
    "answer": ("QUESTION", "TEXT", None),
    "match": ("TEXT", "SCORE", np.float32),
    "image_features": (None, "FEATURES", np.float32),
    "text_features": ("TEXT", "FEATURES", np.float32),
}


def _strings(request, name: str) -> list[str] | None:
    """A BYTES input [b, 1] -> b str, None when the optional input is absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in tensor.as_numpy().reshape(-1)]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.task = config["parameters"]["task"]["string_value"]
        bundle = Path(args["model_repository"]) / args["model_version"] / "bundle"
        self.runtime = BlipRuntime.load(bundle, threads=1)
        self.limits = Limits()

    def _call(self, request) -> Call:
        text_name, _, _ = _IO[self.task]
        images = ()
        if self.task != "text_features":
            tensor = pb_utils.get_input_tensor_by_name(request, "IMAGE")
            images = tuple(open_image(bytes(v), f"IMAGE[{i}]", self.limits)
                           for i, v in enumerate(tensor.as_numpy().reshape(-1)))
        texts = _strings(request, text_name) if text_name else None
        if texts is not None and images and len(texts) != len(images):
            raise RequestError(text_name, f"{len(texts)} rows for {len(images)} images")
        if texts is None and self.task in ("answer", "match", "text_features"):
            raise RequestError(text_name, "missing")
        options = ()
        raw = _strings(request, "OPTIONS") if self.task in ("caption", "answer") else None
        if raw:
            try:
                options = parse_options({"options": json.loads(raw[0])})
            except json.JSONDecodeError as e:
                raise RequestError("OPTIONS", f"not valid JSON ({e})") from None
            if dict(options).get("num_return_sequences", 1) != 1:
                raise RequestError("OPTIONS.num_return_sequences", "a Triton model returns one text per row")
        return Call(self.task, images, None if texts is None else tuple(texts), options)

    def execute(self, requests):
        calls, errors = [], {}
        for i, request in enumerate(requests):
            try:
                calls.append((i, self._call(request)))
            except RequestError as e:
                errors[i] = str(e)
        results, _ = run_calls(self.runtime, [c for _, c in calls])
        out = dict(zip((i for i, _ in calls), results))
        _, name, dtype = _IO[self.task]
        responses = []
        for i in range(len(requests)):
            result = out.get(i)
            if i in errors or isinstance(result, Failed):
                message = errors.get(i) or result.message
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)))
                continue
            if dtype is None:
                array = np.array([[t.encode("utf-8")] for t in result], dtype=np.object_)  # [b, 1] BYTES
            else:
                array = np.asarray(result, dtype=dtype).reshape(len(result), -1)  # [b, 1] or [b, E]
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, array)]))
        return responses
