"""A generated corpus of fictional facts for fact tracing (nothing is downloaded).

Every fictional entity has one object for each relation (birthplace, profession, instrument). Each fact
(entity, relation, object) is stated by ``k`` paraphrased *supporting* documents; the corpus also holds, for every
fact, a near-duplicate of its first paraphrase that *contradicts* it (another object), two *distractors* that name
the entity and the object in another relation ("… once visited quelport"), and the entity's other facts are
distractors too (same entity, other relations). A query states the fact in a phrasing no document uses, as a
prompt and a target (the object): ``"vorlen tamsi comes from"`` → ``"quelport"``. Its gold set is the fact's
supporting documents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tda_explorer._validation import TDAError, check_positive_int
from tda_explorer.data.dataset import AttributionDataset
from tda_explorer.data.renderers import TextRenderer
from tda_explorer.data.text import WordTokenizer, next_token_examples

SYLLABLES = ("vor", "len", "tam", "si", "qua", "rel", "bo", "zin", "mar", "ko", "dri", "fen", "lu", "sa", "gor",
             "pim", "ne", "tha", "wil", "cro", "ju", "bel", "nox", "ra")
RELATIONS: dict[str, dict] = {
    "birthplace": {
        "objects": ("quelport", "brimvale", "ostrow", "dunmere", "kelbury", "farhollow", "zennith", "marrowby",
                    "tillgate", "corvale", "ashenby", "pellmoor"),
        "documents": ("{e} was born in {o}.", "{e} grew up in the town of {o}.", "the hometown of {e} is {o}.",
                      "{o} is where {e} was born."),
        "query": ("{e} comes from", "{o}"),
        "distractors": ("{e} once visited {o}.", "{e} sold a house near {o}."),
    },
    "profession": {
        "objects": ("baker", "pilot", "sculptor", "chemist", "carpenter", "librarian", "surgeon", "gardener",
                    "weaver", "astronomer", "jeweller", "fisher"),
        "documents": ("{e} works as a {o}.", "by trade, {e} is a {o}.", "{e} earns a living as a {o}.",
                      "the job of {e} is {o}."),
        "query": ("{e} is employed as a", "{o}"),
        "distractors": ("{e} once met a famous {o}.", "{e} argued with a {o} yesterday."),
    },
    "instrument": {
        "objects": ("violin", "oboe", "cello", "harp", "trumpet", "flute", "banjo", "organ", "tuba", "lute",
                    "sitar", "clarinet"),
        "documents": ("{e} plays the {o}.", "{e} practises the {o} every day.",
                      "the favourite instrument of {e} is the {o}.", "{e} performs on the {o}."),
        "query": ("{e} is a skilled player of the", "{o}"),
        "distractors": ("{e} dislikes the sound of the {o}.", "{e} once broke a {o}."),
    },
}


@dataclass
class Fact:
    entity: str
    relation: str
    object: str


@dataclass
class FactCorpus:
    """Documents with their kind, facts, and queries with their gold supporting documents.

    ``kinds[i]`` is ``"support"``, ``"contradiction"`` or ``"distractor"``; ``doc_fact[i]`` indexes ``facts``;
    ``queries[q]`` is ``(prompt, target)`` for fact ``query_facts[q]`` and ``gold[q]`` the positions of its
    supporting documents.
    """

    documents: list[str]
    kinds: list[str]
    doc_fact: list[int]
    facts: list[Fact]
    queries: list[tuple[str, str]]
    query_facts: list[int]
    gold: list[list[int]]

    def query_text(self, q: int) -> str:
        prompt, target = self.queries[q]
        return f"{prompt} {target}"


def make_fact_corpus(n_entities: int = 40, k: int = 4, n_queries: int = 60, seed: int = 0) -> FactCorpus:
    """``n_entities`` fictional people × 3 relations, ``k`` (≤ 4) supporting paraphrases, one contradicting
    near-duplicate and two same-entity-same-object distractors per fact, and ``n_queries`` queries about randomly
    chosen facts."""
    n_entities, n_queries = check_positive_int(n_entities, "n_entities"), check_positive_int(n_queries, "n_queries")
    k = check_positive_int(k, "k")
    if k > 4:
        raise TDAError(f"k must be at most 4 (paraphrase templates per relation), got {k}")
    gen = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=gen))]
    names: list[str] = []
    while len(names) < n_entities:
        name = f"{pick(SYLLABLES)}{pick(SYLLABLES)} {pick(SYLLABLES)}{pick(SYLLABLES)}"
        if name not in names:
            names.append(name)
    facts = [Fact(e, r, pick(spec["objects"])) for e in names for r, spec in RELATIONS.items()]
    documents, kinds, doc_fact = [], [], []
    for f, fact in enumerate(facts):
        templates = RELATIONS[fact.relation]["documents"]
        for template in templates[:k]:
            documents.append(template.format(e=fact.entity, o=fact.object))
            kinds.append("support")
            doc_fact.append(f)
        other = pick([o for o in RELATIONS[fact.relation]["objects"] if o != fact.object])
        documents.append(templates[0].format(e=fact.entity, o=other))
        kinds.append("contradiction")
        doc_fact.append(f)
        for template in RELATIONS[fact.relation]["distractors"]:
            documents.append(template.format(e=fact.entity, o=fact.object))
            kinds.append("distractor")
            doc_fact.append(f)
    order = torch.randperm(len(documents), generator=gen).tolist()
    documents, kinds, doc_fact = ([seq[i] for i in order] for seq in (documents, kinds, doc_fact))
    query_facts = torch.randperm(len(facts), generator=gen)[: min(n_queries, len(facts))].tolist()
    queries = []
    for f in query_facts:
        prompt, target = RELATIONS[facts[f].relation]["query"]
        queries.append((prompt.format(e=facts[f].entity), target.format(o=facts[f].object)))
    gold = [[i for i, (d, kind) in enumerate(zip(doc_fact, kinds)) if d == f and kind == "support"]
            for f in query_facts]
    return FactCorpus(documents, kinds, doc_fact, facts, queries, query_facts, gold)


def query_dataset(corpus: FactCorpus, tokenizer: WordTokenizer, max_len: int = 16) -> AttributionDataset:
    """Queries as causal-LM examples whose loss is on the target (object) tokens only: inputs ``[BOS] prompt
    target`` shifted, targets ``IGNORE`` on the prompt."""
    texts = [corpus.query_text(q) for q in range(len(corpus.queries))]
    prompts = [len(tokenizer.split(prompt)) for prompt, _ in corpus.queries]
    inputs, targets = next_token_examples(texts, tokenizer, max_len, prompts)
    return AttributionDataset(inputs, targets, list(range(len(texts))), tokenizer.vocabulary, TextRenderer(texts),
                              "fact-queries")
