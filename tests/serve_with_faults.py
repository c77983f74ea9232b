"""The real server (`hf_attention.serving.server.main`) with faults the serving tests ask for, by sentence:

- a sentence holding `SLOW` makes its batch take `HF_ATTENTION_TEST_SLOW_SECONDS` (default 1.5) longer;
- a sentence holding `FAIL` makes its batch raise;
- `HF_ATTENTION_TEST_LOAD_SECONDS` delays the model's loading.
"""

import os
import time

from hf_attention.serving.app import TranslationService
from hf_attention.serving.server import main

decode, load = TranslationService.decode, TranslationService.load


def slow_or_failing_decode(self, sentences, options):
    texts = [sentence.text for sentence in sentences]  # serving.schema.Source: the text and its target prefix
    if any("FAIL" in text for text in texts):
        raise RuntimeError("a fault the test injected")
    if any("SLOW" in text for text in texts):
        time.sleep(float(os.environ.get("HF_ATTENTION_TEST_SLOW_SECONDS", "1.5")))
    return decode(self, sentences, options)


def slow_load(self):
    time.sleep(float(os.environ.get("HF_ATTENTION_TEST_LOAD_SECONDS", "0")))
    load(self)


TranslationService.decode, TranslationService.load = slow_or_failing_decode, slow_load

if __name__ == "__main__":
    main()
