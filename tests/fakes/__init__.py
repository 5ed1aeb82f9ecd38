"""Importable test support: fake model servers and the small tokenizer they share.

- ``tests.fakes.tokenizer``: ``build_tokenizer_dir`` (a byte-level BPE tokenizer directory, built locally)
  and its ``EOS`` token.
- ``tests.fakes.sglang``: ``FakeSGLang``, a strict fake SGLang 0.5.23 server, and ``RefusingTransport``.
- ``tests.fakes.openai``: ``FakeCompletions``, a fake ``/v1/completions`` server (vLLM-like or hosted).

Both the backends' own contract tests and ``tests/conformance/test_backend_conformance.py`` use them.
"""
