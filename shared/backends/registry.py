"""Build a model backend from a one-line spec (``ASYNCTHINK_MODEL`` / ``--model``).

Accepted forms:

- ``/path/to/model-dir`` (or a relative path): the in-process transformers backend on ``settings.device``.
- ``sglang:http://h1:30000,http://h2:30000?tokenizer=/path/to/model-dir``: SGLang replicas (sticky routing
  over the list). API keys come from ``ASYNCTHINK_SGLANG_API_KEY`` / ``ASYNCTHINK_SGLANG_ADMIN_API_KEY``.
- ``openai:http://host:8000/v1#served-model-name?tokenizer=/path/to/model-dir``: an OpenAI-compatible
  ``/v1/completions`` server. Extra query keys: ``mode=vllm|hosted`` (default vllm: token prompts and
  vLLM's token-id extensions; hosted: text prompts, stops applied client-side) and ``max_stops=N``.
  The key comes from ``ASYNCTHINK_OPENAI_API_KEY`` or ``OPENAI_API_KEY``.

Every form takes ``prompt=trained|protocol`` (``DIR?prompt=protocol`` for a directory): ``trained`` sends
the tasks' short prompts, which models trained here learnt; ``protocol`` sends a system message that
teaches the Fork/Join protocol, in the model's chat template (:mod:`shared.tasks.prompts`). The default
is ``trained`` for a local directory and ``protocol`` for a served model.

The tokenizer directory is required for the HTTP backends: token ids must mean what the served model
means, and a silently different tokenizer would corrupt every trace. Backends are imported lazily, so
choosing SGLang never imports torch, and a local directory never imports httpx.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qs

from shared.backends.base import ModelBackend
from shared.config import Settings, get_settings
from shared.tasks.prompts import PromptStyle

FORMS = (
    "a local model directory (e.g. models/asyncthink-countdown-small), "
    "'sglang:http://h1:30000,http://h2:30000?tokenizer=/path/to/model-dir', or "
    "'openai:http://host:8000/v1#model-name?tokenizer=/path/to/model-dir'"
)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(?!\\)")


def _split_query(text: str, spec: str) -> tuple[str, dict[str, str]]:
    head, _, query = text.partition("?")
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = set(params) - {"tokenizer", "mode", "max_stops", "prompt"}
    if unknown:
        raise ValueError(f"model spec {spec!r}: unknown option(s) {sorted(unknown)}; accepted forms: {FORMS}")
    return head, params


def _prompt_style(params: dict[str, str], spec: str, default: PromptStyle) -> PromptStyle:
    value = params.get("prompt")
    if value is None:
        return default
    try:
        return PromptStyle(value)
    except ValueError:
        choices = ", ".join(s.value for s in PromptStyle)
        raise ValueError(f"model spec {spec!r}: prompt must be one of {choices}, got {value!r}") from None


def _tokenizer(params: dict[str, str], spec: str) -> Path:
    if not params.get("tokenizer"):
        raise ValueError(
            f"model spec {spec!r} needs ?tokenizer=/path/to/model-dir (the served model's tokenizer, "
            f"read locally); accepted forms: {FORMS}"
        )
    path = Path(params["tokenizer"]).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {path} (from model spec {spec!r}) does not exist; the shipped model lives "
            "under models/"
        )
    return path


def open_backend(spec: str, settings: Settings | None = None) -> ModelBackend:
    """The backend a spec names (see the module docstring); ValueError for an unknown form."""
    settings = settings or get_settings()
    spec = spec.strip()
    if not spec:
        raise ValueError(f"empty model spec; accepted forms: {FORMS}")
    m = _SCHEME.match(spec)
    scheme = m.group(1).lower() if m else None
    if scheme == "sglang":
        urls_text, params = _split_query(spec[len("sglang:") :], spec)
        urls = [u.strip() for u in urls_text.split(",") if u.strip()]
        if not urls or not all(u.startswith(("http://", "https://")) for u in urls):
            raise ValueError(
                f"model spec {spec!r}: list SGLang URLs as http://host:port; accepted forms: {FORMS}"
            )
        from shared.backends.sglang import SGLangBackend

        return SGLangBackend(
            urls,
            _tokenizer(params, spec),
            timeout_s=settings.request_timeout_s,
            api_key=os.environ.get("ASYNCTHINK_SGLANG_API_KEY") or None,
            admin_api_key=os.environ.get("ASYNCTHINK_SGLANG_ADMIN_API_KEY") or None,
            prompt_style=_prompt_style(params, spec, PromptStyle.PROTOCOL),
        )
    if scheme == "openai":
        rest = spec[len("openai:") :]
        url, _, fragment = rest.partition("#")
        url, url_params = _split_query(url, spec)
        model, params = _split_query(fragment, spec)
        params = {**url_params, **params}
        if not url.startswith(("http://", "https://")) or not model:
            raise ValueError(f"model spec {spec!r}: expected openai:URL#model-name; accepted forms: {FORMS}")
        mode = params.get("mode", "vllm")
        if mode not in ("vllm", "hosted"):
            raise ValueError(f"model spec {spec!r}: mode must be vllm or hosted, got {mode!r}")
        max_stops = params.get("max_stops")
        from shared.backends.openai_compat import OpenAICompatBackend

        return OpenAICompatBackend(
            url,
            model,
            _tokenizer(params, spec),
            api_key=os.environ.get("ASYNCTHINK_OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEY") or None,
            token_prompts=mode == "vllm",
            vllm_extensions=mode == "vllm",
            max_stops=int(max_stops) if max_stops else None,
            timeout_s=settings.request_timeout_s,
            prompt_style=_prompt_style(params, spec, PromptStyle.PROTOCOL),
        )
    if scheme is not None and len(scheme) > 1:  # "C:" style drive letters fall through to a path
        raise ValueError(f"unknown model spec {spec!r} (scheme {scheme!r}); accepted forms: {FORMS}")
    path_text, params = spec, {}
    if "?" in spec and not Path(spec).expanduser().is_dir():
        path_text, params = _split_query(spec, spec)
    path = Path(path_text).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {path} does not exist; the shipped model lives under models/ "
            "(models/asyncthink-countdown-small), or name a server: " + FORMS
        )
    from shared.backends.transformers_backend import TransformersBackend

    backend: ModelBackend = TransformersBackend(
        path, device=settings.device, prompt_style=_prompt_style(params, spec, PromptStyle.TRAINED)
    )
    return backend
