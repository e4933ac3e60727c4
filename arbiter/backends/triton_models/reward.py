"""Triton Python-backend model for an Arbiter reward model (written by
``arbiter triton export`` as ``REPO/NAME/N/model.py``).

Runs the same forward as Arbiter's in-process backend: right-padded batch with
an attention mask, score = the model's own pooled logit. Self-contained on
purpose (only torch, transformers and numpy): it runs inside Triton's Python
environment, where Arbiter is not installed.

Inputs  INPUT_IDS int64 [B, T] (right-padded; anything past LENGTHS is ignored)
        LENGTHS   int64 [B, 1] (real tokens per row, >= 1)
Output  SCORES    fp32  [B, 1]
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import torch
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("torch_threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        checkpoint = os.path.join(args["model_repository"], args["model_version"], "checkpoint")
        if args.get("model_instance_kind") == "GPU":
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        else:
            self.device = torch.device("cpu")
        dtype = getattr(torch, params.get("dtype") or "float32")
        model = AutoModelForSequenceClassification.from_pretrained(checkpoint, local_files_only=True, dtype=dtype)
        if model.config.num_labels != 1:
            raise ValueError(f"{checkpoint} has num_labels={model.config.num_labels}; a reward model needs exactly 1")
        # Same pad id as Arbiter's in-process backend: HF pools at the last
        # non-pad token, so the pad id decides which logit is the score.
        if model.config.pad_token_id is None:
            model.config.pad_token_id = int(params["pad_token_id"])
        self.pad = model.config.pad_token_id
        self.vocab = model.get_input_embeddings().num_embeddings
        limits = [
            getattr(model.config, attr)
            for attr in ("max_position_embeddings", "n_positions", "n_ctx")
            if isinstance(getattr(model.config, attr, None), int)
        ]
        self.max_tokens = min(limits) if limits else None
        self.model = model.to(self.device).eval()
        self.torch = torch

    def _read(self, request):
        ids = pb_utils.get_input_tensor_by_name(request, "INPUT_IDS").as_numpy()
        lengths = pb_utils.get_input_tensor_by_name(request, "LENGTHS").as_numpy().reshape(-1)
        if ids.ndim != 2 or ids.shape[0] != lengths.shape[0]:
            raise ValueError(f"INPUT_IDS {list(ids.shape)} and LENGTHS {list(lengths.shape)} disagree on batch size")
        if lengths.size and (lengths.min() < 1 or lengths.max() > ids.shape[1]):
            raise ValueError(f"LENGTHS must be in 1..{ids.shape[1]} (the width of INPUT_IDS)")
        if self.max_tokens is not None and lengths.size and lengths.max() > self.max_tokens:
            raise ValueError(f"a sequence of {lengths.max()} tokens is over the model's max of {self.max_tokens}")
        rows = [ids[i, : lengths[i]] for i in range(ids.shape[0])]
        for row in rows:
            if row.size and (row.min() < 0 or row.max() >= self.vocab):
                raise ValueError(f"token ids must be in 0..{self.vocab - 1}")
        return rows

    def execute(self, requests):
        torch = self.torch
        responses = [None] * len(requests)
        rows, owners = [], []
        for r, request in enumerate(requests):
            try:
                request_rows = self._read(request)
            except ValueError as err:
                responses[r] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(err)))
                continue
            rows.extend(request_rows)
            owners.append((r, len(request_rows)))
        if rows:
            width = max(len(row) for row in rows)
            input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                input_ids[i, : len(row)] = torch.from_numpy(row.astype(np.int64))
                attention_mask[i, : len(row)] = 1
            with torch.inference_mode():
                logits = self.model(
                    input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
                ).logits
            scores = logits[:, :1].float().cpu().numpy()
            start = 0
            for r, count in owners:
                out = pb_utils.Tensor("SCORES", scores[start : start + count])
                responses[r] = pb_utils.InferenceResponse(output_tensors=[out])
                start += count
        return responses

    def finalize(self):
        self.model = None
