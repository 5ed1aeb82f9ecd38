"""Importable test support: fake model servers and the small tokenizer they share.

- ``tests.fakes.tokenizer``: ``build_tokenizer_dir`` (a byte-level BPE tokenizer directory, built locally)
  and its ``EOS`` token.
- ``tests.fakes.sglang``: ``FakeSGLang``, a strict fake SGLang 0.5.23 server, and ``RefusingTransport``.
- ``tests.fakes.openai``: ``FakeCompletions``, a fake ``/v1/completions`` server (vLLM-like or hosted).

Both the backends' own contract tests and ``tests/conformance/test_backend_conformance.py`` use them.
"""


def resume_point(prompt: list[int], script: list[int]) -> int:
    """Where a fake that plays ``script`` as its model's output resumes for ``prompt``: the length of the
    longest suffix of ``prompt`` that is a prefix of ``script`` (0: start from the beginning). So a request
    whose prompt ends with the ids a fake generated earlier continues the script instead of restarting it,
    as a greedy model would."""
    for n in range(min(len(prompt), len(script)), 0, -1):
        if prompt[-n:] == script[:n]:
            return n
    return 0
