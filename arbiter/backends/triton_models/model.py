"""Triton Python-backend model for an Arbiter model version (written by
``arbiter triton export`` as ``REPO/NAME/N/model.py``), one file for every
kind; the kind is the config parameter ``arbiter_kind``.

Runs the same computation as Arbiter's in-process backend, on the checkpoint
copied into ``N/checkpoint/``. Self-contained on purpose (only torch,
transformers and numpy): it runs inside Triton's Python environment, where
Arbiter is not installed. The tensors are those of
``arbiter/backends/signatures.py``:

reward     INPUT_IDS int64 [B, T] right-padded (anything past LENGTHS is ignored)
           LENGTHS   int64 [B, 1] real tokens per row, >= 1
        -> SCORES    fp32  [B, 1] the sequence-classification model's pooled logit
reference  INPUT_IDS          int64 [B, T] prompt then completion, right-padded
           PROMPT_LENGTHS     int64 [B, 1] >= 1: the first completion token needs context
           COMPLETION_LENGTHS int64 [B, 1] >= 1
        -> LOGPROBS           fp32  [B, C] C = the request's longest completion; row i holds
                                           COMPLETION_LENGTHS[i] values (float64 log-softmax), then 0

The weights load in the config parameter ``dtype`` (float32, bfloat16,
float16) on the instance's device (a KIND_GPU instance's GPU, else the CPU);
outputs are computed from up-cast logits, as in-process. With the parameter
``compile`` ("true", ``arbiter triton export --compile``) the forward runs
compiled by ``torch.compile`` with dynamic shapes, every graph built in
``initialize`` by warm-up batches (as ``arbiter.backends.compiled`` does
in-process), so Triton marks the version ready only once no request will
wait for a compile; a failure fails the load and the old version serves on.
"""

import inspect
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import torch
        import transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        # Configs written before kinds were recorded are reward models.
        self.kind = params.get("arbiter_kind") or "reward"
        if self.kind not in ("reward", "reference"):
            raise ValueError(f"arbiter_kind {self.kind!r} is not served by this model file")
        threads = int(params.get("torch_threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        checkpoint = os.path.join(args["model_repository"], args["model_version"], "checkpoint")
        if args.get("model_instance_kind") == "GPU":
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        else:
            self.device = torch.device("cpu")
        dtype_name = params.get("dtype") or "float32"
        if dtype_name not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {dtype_name!r} is not float32, bfloat16 or float16; re-export with --dtype")
        dtype = getattr(torch, dtype_name)
        auto = (transformers.AutoModelForSequenceClassification if self.kind == "reward"
                else transformers.AutoModelForCausalLM)
        model = auto.from_pretrained(checkpoint, local_files_only=True, dtype=dtype)
        if self.kind == "reward" and model.config.num_labels != 1:
            raise ValueError(f"{checkpoint} has num_labels={model.config.num_labels}; a reward model needs exactly 1")
        # The pad id Arbiter's in-process backend pads with (the config's, else
        # the tokenizer's), resolved at export. For a reward model it decides
        # which logit HF pools.
        if model.config.pad_token_id is None:
            model.config.pad_token_id = int(params["pad_token_id"])
        self.pad = int(model.config.pad_token_id)
        # Ids index the input embeddings (and a causal LM's output logits): all must hold them.
        self.vocab = model.get_input_embeddings().num_embeddings
        if self.kind == "reference":
            self.vocab = min(self.vocab, int(model.get_output_embeddings().weight.shape[0]))
        limits = [
            getattr(model.config, attr)
            for attr in ("max_position_embeddings", "n_positions", "n_ctx")
            if isinstance(getattr(model.config, attr, None), int)
        ]
        self.max_tokens = min(limits) if limits else None
        if self.device.type == "cuda":
            # cuDNN's attention builds a plan per input shape, and batches here
            # change shape every time (arbiter.backends.placement.shape_generic_attention).
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.model = model.to(self.device).eval()
        self.torch = torch
        # A whole-sequence forward needs no KV cache; encoder models take no such argument
        # (arbiter.lm.no_cache).
        self.no_cache = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
        if params.get("compile") == "true":
            self._compile(checkpoint)

    def _compile(self, checkpoint):
        """Compile the forward and run it once per shape specialization:
        torch specializes sizes 0 and 1, so one row and two (one padded), one
        token (a reward item; a reference pair has at least two) and four."""
        import locale

        torch = self.torch
        # Inductor reads its kernel templates with the locale's encoding, and
        # Triton's Python stubs inherit the server's, often C (ASCII): they
        # are UTF-8 text. This process is this model instance's alone.
        if locale.getpreferredencoding(False).lower().replace("-", "") != "utf8":
            try:
                locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
            except locale.Error:
                pass  # the compile then fails naming the decode error; PYTHONUTF8=1 for Triton mends it
        config = torch._dynamo.config
        # Graphs per code object, shared by every architecture this process runs.
        config.recompile_limit = max(config.recompile_limit, 64)
        self.model.compile(dynamic=True)
        shortest = 1 if self.kind == "reward" else 2
        try:
            for rows in (1, 2):
                for width in (shortest, 4):
                    input_ids = torch.zeros((rows, width), dtype=torch.long, device=self.device)
                    attention_mask = torch.ones((rows, width), dtype=torch.long, device=self.device)
                    if rows > 1 and width > shortest:
                        attention_mask[-1, -1] = 0  # a padded row
                    with torch.inference_mode():
                        self.model(input_ids=input_ids, attention_mask=attention_mask, **self.no_cache)
        except Exception as err:
            cause = err
            for _ in range(16):
                inner = getattr(cause, "inner_exception", None) or cause.__cause__
                if inner is None:
                    break
                cause = inner
            lines = str(cause).strip().splitlines()
            raise RuntimeError(
                f"compile: torch.compile could not compile {checkpoint} ({type(cause).__name__}: "
                f"{lines[0] if lines else 'no message'}); re-export without --compile"
            ) from err

    def _read(self, request):
        """-> [(ids of one row, prompt length or 0)] of one request, or ValueError."""
        ids = pb_utils.get_input_tensor_by_name(request, "INPUT_IDS").as_numpy()
        width = ids.shape[1] if ids.ndim == 2 else 0
        if self.kind == "reward":
            lengths = pb_utils.get_input_tensor_by_name(request, "LENGTHS").as_numpy().reshape(-1)
            prompts = np.zeros_like(lengths)
            if ids.ndim != 2 or ids.shape[0] != lengths.shape[0]:
                raise ValueError(
                    f"INPUT_IDS {list(ids.shape)} and LENGTHS {list(lengths.shape)} disagree on batch size")
            if lengths.size and (lengths.min() < 1 or lengths.max() > width):
                raise ValueError(f"LENGTHS must be in 1..{width} (the width of INPUT_IDS)")
        else:
            prompts = pb_utils.get_input_tensor_by_name(request, "PROMPT_LENGTHS").as_numpy().reshape(-1)
            completions = pb_utils.get_input_tensor_by_name(request, "COMPLETION_LENGTHS").as_numpy().reshape(-1)
            if ids.ndim != 2 or not ids.shape[0] == prompts.shape[0] == completions.shape[0]:
                raise ValueError(
                    f"INPUT_IDS {list(ids.shape)}, PROMPT_LENGTHS {list(prompts.shape)} and COMPLETION_LENGTHS "
                    f"{list(completions.shape)} disagree on batch size"
                )
            if prompts.size and (prompts.min() < 1 or completions.min() < 1):
                raise ValueError("PROMPT_LENGTHS and COMPLETION_LENGTHS must be >= 1")
            lengths = prompts + completions
            if lengths.size and lengths.max() > width:
                raise ValueError(f"PROMPT_LENGTHS + COMPLETION_LENGTHS must be <= {width} (the width of INPUT_IDS)")
        if self.max_tokens is not None and lengths.size and lengths.max() > self.max_tokens:
            raise ValueError(f"a sequence of {lengths.max()} tokens is over the model's max of {self.max_tokens}")
        rows = []
        for i in range(ids.shape[0]):
            row = ids[i, : lengths[i]]
            if row.min() < 0 or row.max() >= self.vocab:
                raise ValueError(f"token ids must be in 0..{self.vocab - 1}")
            rows.append((row, int(prompts[i])))
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
        if not rows:
            return responses
        # Rows of every request in one forward, padded as in-process: a causal
        # model's real positions are unaffected by right padding.
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, _) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.from_numpy(ids.astype(np.int64))
            attention_mask[i, : len(ids)] = 1
        with torch.inference_mode():
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), **self.no_cache
            ).logits
            values = self._scores(logits) if self.kind == "reward" else self._logprobs(logits, rows)
        start = 0
        for r, count in owners:
            mine = values[start : start + count]
            start += count
            if self.kind == "reward":
                out = pb_utils.Tensor("SCORES", np.asarray(mine, dtype=np.float32).reshape(count, 1))
            else:
                padded = np.zeros((count, max(len(v) for v in mine)), dtype=np.float32)
                for i, v in enumerate(mine):
                    padded[i, : len(v)] = v
                out = pb_utils.Tensor("LOGPROBS", padded)
            responses[r] = pb_utils.InferenceResponse(output_tensors=[out])
        return responses

    def _scores(self, logits):
        return list(logits[:, 0].float().cpu().numpy())

    def _logprobs(self, logits, rows):
        torch = self.torch
        # Every row's completion ids in one copy to the device (a copy per row
        # would wait for the device each time).
        tokens = torch.from_numpy(np.concatenate([ids[prompt:] for ids, prompt in rows]).astype(np.int64))
        tokens = tokens.to(self.device)
        values, start = [], 0
        for i, (ids, prompt) in enumerate(rows):
            # Position t predicts token t + 1: completion token k sits at prompt + k.
            item = logits[i, prompt - 1 : len(ids) - 1]
            mine = tokens[start : start + len(ids) - prompt, None]
            values.append(torch.log_softmax(item.double(), dim=-1).gather(-1, mine)[:, 0])
            start += len(ids) - prompt
        # One copy off the device for the whole batch, not one per row.
        flat = torch.cat(values).float().cpu().numpy()
        out, start = [], 0
        for ids, prompt in rows:
            out.append(flat[start : start + len(ids) - prompt])
            start += len(ids) - prompt
        return out

    def finalize(self):
        self.model = None
