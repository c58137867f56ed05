"""Hybrid: ESP, prompt lookup and an n-gram pool merged into one scored trie, verified in one forward.

ESP (embedding-space probing) guesses well where the text is new and poorly where it repeats;
prompt lookup is the opposite (ESP's paper names retrieval-heavy tasks as its weak spot). Each
step this drafter gathers the candidates of three sources,

    esp    the best-first tree of ESP's mask predictions (ranked_tree in esp.py)
    pld    continuations of earlier occurrences of the text's last tokens (find_continuations)
    pool   n-grams of the committed text that followed the root token before (NGramPool, the
           pool of lookahead decoding, here fed by the committed text only: no Jacobi rows)

and scores every node with an estimate of the probability that the target accepts its whole path:
the product, along the path, of the node's conditional acceptance estimate, which is for ESP its
mask probability times ESP's calibration factor, and for pld and pool the acceptance rate measured
so far in this generation for that source, at that depth and rank of the candidate among the
source's own (nodes tested = parent accepted; a first-ranked candidate the budget left out is
scored for free against the token the target then chose). Steps in *copy mode* keep rates of their own: when
the previous step accepted at least COPY_RUN tokens that a copying source (pld or pool) proposed,
or the text's last COPY_NGRAM tokens occurred before (evidence that needs no draft: where drafting
does not pay at copy-free rates, as on a steep cost curve, nothing else would ever test one), the
text is likely inside a repeated passage, where copied drafts are accepted far more often than
on average (greedy answers that repeat their context make long runs of such steps). The sources'
trees are merged into one trie (`merge_scored`): a node proposed by several sources keeps its best
score. The first n nodes by score form the tree, n chosen by the hardware-aware budget
(budget.py) from the target's cost curve, or fixed with `budget=N`. ESP's mask rows follow the
root and every node ESP proposed (not the copied ones: rows are what a forward costs on a CPU), so
next step's ESP candidates are computed in this forward unless a copied node ends the accepted path.
With `--budget auto` the mask rows are themselves a choice: they cost rows now and pay next step,
by what ESP's candidates have added beyond the copying sources so far (a running mean); where a
row costs much (llama.cpp on a CPU: a second row costs 1.3-1.8x the first) and ESP adds little,
the step runs without them, and with nothing to verify the hybrid is plain decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.budget import AutoBudget, Calibration, ChainCalibration, nodes_tested, parse_budget
from ..engine.protocol import Drafter, Proposal, StepResult
from ..engine.tree import ROOT, DraftTree, Layout
from ..errors import InvalidOptionError
from .esp import ESPConfig, ESPDrafter, ranked_tree
from .ngram import NGramPool, ends_in_repeat, find_continuations
from .suffix import OUTPUTS_KEY, GlobalOutputs, SuffixConfig, SuffixSource
from .token_recycling import computed_rows, shared_matrix

SOURCES = ("esp", "pld", "pool", "recycle", "suffix")
SCORED_SOURCES = ("recycle", "suffix")  # sources with their own probability per node, calibrated like ESP's
PRIORS = {"pld": 0.6, "pool": 0.4}  # acceptance rates assumed before any evidence
PRIOR_WEIGHT = 2.0
MAX_DEPTH_BUCKET = 16  # acceptance rates are kept per depth up to this one
MAX_RANK_BUCKET = 2  # ... and per rank of a source's candidate: 0, 1, 2 and beyond
COPY_RUN = 2  # accepted copied tokens in a step that put the next step in copy mode
COPY_NGRAM = 4  # ... as does a text whose last COPY_NGRAM tokens occurred before (it is copying, drafts or not)
COPY_PRIOR = 0.85  # the acceptance rate assumed in copy mode before any evidence
ESP_GAIN_PRIOR = 0.3  # tokens per step ESP's mask rows are assumed to add, before any evidence
GAIN_RATE = 0.1  # weight of the latest step in that running mean
EXPLORE_EVERY = 32  # steps without mask rows after which they run once again, to measure ESP anew
MIN_SCORE = 0.02  # copied nodes whose path score falls below this are not offered


@dataclass
class HybridConfig:
    masks: int = 1  # ESP: mask rows after each node
    branching: int = 2  # ESP: candidates per depth
    esp_nodes: int = 6  # ESP: nodes of ESP's own tree offered to the merge
    mask_init: str = "vocab-mean"
    max_ngram: int = 3  # PLD: longest suffix searched for
    num_pred_tokens: int = 32  # PLD: tokens copied after a match (the budget keeps what pays: deeper
    # than pld's 10, since long copies are where this drafter's trees gain most)
    max_candidates: int = 4  # PLD: continuations offered (as many as --method pld merges)
    ngram: int = 4  # pool: n-gram length (the root token + n - 1 drafts)
    pool_per_key: int = 3  # pool: n-grams kept per root token
    recycle: bool = True  # Token Recycling's adjacency matrix as a source (token_recycling.py)
    suffix: bool = True  # suffix tries over this text and earlier outputs as a source (suffix.py)
    source_nodes: int = 16  # nodes of the recycle and suffix sources' own trees offered to the merge
    budget: int | str = "auto"  # nodes per step, or auto (budget.py)
    max_budget: int = 64  # the largest tree auto considers (where rows are nearly free, as on a GPU,
    # the trees grow past pld's fixed 32 nodes)

    def __post_init__(self):
        self.budget = parse_budget(self.budget)
        for name in ("masks", "branching", "esp_nodes", "max_ngram", "num_pred_tokens", "max_candidates", "pool_per_key", "max_budget"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidOptionError(f"hybrid option {name} must be an integer >= 1, got {value!r}")
        if self.ngram < 2:
            raise InvalidOptionError(f"hybrid option ngram must be >= 2, got {self.ngram}")


@dataclass
class ScoredPath:
    """A candidate sequence below the root with, per token, its path score (non-increasing)."""

    source: str
    tokens: list[int]
    scores: list[float]
    conditional: list[float] | None = None  # the source's own probability of each token given the one before (scored sources)


def merge_scored(paths: list[ScoredPath]) -> tuple[DraftTree, list[float], list[dict[str, float | None]]]:
    """Merge scored paths into one trie; nodes ordered best score first (parents before children).

    Returns the tree, each node's score (the best of the paths through it) and its sources (each
    with its own conditional probability of the node, None for a source that has none).

    >>> t, s, src = merge_scored([ScoredPath("pld", [5, 6, 7], [0.6, 0.36, 0.2]),
    ...                           ScoredPath("esp", [5, 8], [0.7, 0.3])])
    >>> t.tokens, t.parents, s
    ([5, 6, 8, 7], [-1, 0, 0, 1], [0.7, 0.36, 0.3, 0.2])
    >>> sorted(src[0])
    ['esp', 'pld']
    """
    key_of: dict[tuple, int] = {}  # (parent key index or -1, token) -> trie entry
    entries: list[list] = []  # [token, parent entry, score, depth, sources]
    for path in paths:
        parent = ROOT
        for depth, (token, score) in enumerate(zip(path.tokens, path.scores), start=1):
            key = (parent, token)
            e = key_of.get(key)
            cond = path.conditional[depth - 1] if path.conditional else None
            if e is None:
                e = key_of[key] = len(entries)
                entries.append([token, parent, score, depth, {path.source: cond}])
            else:
                entries[e][2] = max(entries[e][2], score)
                entries[e][4].setdefault(path.source, cond)
            parent = e
    # a child never outscores its parent: keep scores monotone after the max-merge
    for e in entries:
        if e[1] != ROOT:
            e[2] = min(e[2], entries[e[1]][2])
    order = sorted(range(len(entries)), key=lambda i: (-entries[i][2], entries[i][3], i))
    new_index = {old: new for new, old in enumerate(order)}
    tree = DraftTree()
    for old in order:
        token, parent = entries[old][0], entries[old][1]
        tree.add(token, ROOT if parent == ROOT else new_index[parent])
    return tree, [entries[i][2] for i in order], [entries[i][4] for i in order]


def scored_paths(source: str, tree: DraftTree, scores: list[float], factor: float) -> list[ScoredPath]:
    """The root-to-leaf paths of a source's best-first tree, each node scored by the product of
    its path's calibrated conditional probabilities, min(1, p x factor), cut where that falls
    below MIN_SCORE.

    >>> paths = scored_paths("recycle", DraftTree([7, 8, 9], [-1, 0, -1]), [0.8, 0.4, 0.1], factor=0.5)
    >>> [(p.tokens, [round(s, 2) for s in p.scores], p.conditional) for p in paths]
    [([7, 8], [0.4, 0.1], [0.8, 0.5]), ([9], [0.05], [0.1])]
    """
    has_child = set(p for p in tree.parents if p != ROOT)
    paths = []
    for leaf in range(len(tree)):
        if leaf in has_child:
            continue
        nodes = tree.path_to(leaf)
        tokens, out_scores, conds, score = [], [], [], 1.0
        for i in nodes:
            parent = tree.parents[i]
            cond = scores[i] / (scores[parent] if parent != ROOT else 1.0)
            score *= min(1.0, cond * factor)
            if score < MIN_SCORE:
                break
            tokens.append(tree.tokens[i])
            out_scores.append(score)
            conds.append(cond)
        if tokens:
            paths.append(ScoredPath(source, tokens, out_scores, conds))
    return paths


class SourceRates:
    """Acceptance rate per (source, depth) of the nodes tested so far, from a prior."""

    def __init__(self):
        self.counts: dict[tuple[str, int], list[float]] = {}

    def rate(self, source: str, depth: int) -> float:
        """source: "pld#0" (the best-ranked continuation), "pld#1", "pool#0", ...; "pld#0@copy": the
        same in copy mode."""
        acc, tested = self.counts.get((source, min(depth, MAX_DEPTH_BUCKET)), (0.0, 0.0))
        name, _, rest = source.partition("#")
        rank, _, mode = rest.partition("@")
        prior = (COPY_PRIOR if mode == "copy" else PRIORS[name]) * (0.5 if rank not in ("", "0") else 1.0)
        return (acc + prior * PRIOR_WEIGHT) / (tested + PRIOR_WEIGHT)

    def update(self, source: str, depth: int, accepted: bool) -> None:
        c = self.counts.setdefault((source, min(depth, MAX_DEPTH_BUCKET)), [0.0, 0.0])
        c[0] += accepted
        c[1] += 1


class HybridDrafter(Drafter):
    name = "hybrid"

    def __init__(self, config: HybridConfig | None = None, **options):
        self.config = config or HybridConfig(**options)
        c = self.config
        self.esp = ESPDrafter(ESPConfig(masks=c.masks, branching=c.branching, budget=c.esp_nodes, mask_init=c.mask_init))

    def start(self, session) -> None:
        c = self.config
        self.esp.start(session)
        self.pool = NGramPool(c.ngram, c.pool_per_key, 1 << 16)
        self.pool.add_text(session.ids)
        self.pooled_upto = max(0, len(session.ids) - c.ngram + 1)
        self.rates = SourceRates()
        self.auto = AutoBudget(session.target, kind=self.name, session=session) if c.budget == "auto" else None
        self.esp_depths_before = []
        self.copy_mode = False
        self.esp_gain = ESP_GAIN_PRIOR  # tokens ESP's candidates add per step beyond the copying sources (running mean)
        self.steps_bare = 0
        self.first_candidates: list[tuple[str, int, float | None]] = []
        target = session.target
        self.calibration = {name: Calibration() for name in SCORED_SOURCES}
        # kept across requests, as the step costs are: it measures the sources' merged estimates on this model
        self.chain_calibration = target.drafter_state().setdefault(("chain-calibration", self.name), ChainCalibration())
        self.chain: tuple[list[int], list[float]] | None = None  # this step's best chain (tokens, raw conditionals), drafted or not
        self.matrix = shared_matrix(target, self.name, 8, None) if c.recycle else None
        self.suffix = None
        if c.suffix:
            suffix_config = SuffixConfig()
            key = (OUTPUTS_KEY, self.name, suffix_config.max_tree_depth, suffix_config.max_cached_requests)
            outputs = target.drafter_state().setdefault(key, GlobalOutputs(suffix_config.max_tree_depth, suffix_config.max_cached_requests))
            self.suffix = SuffixSource(suffix_config, session.ids, outputs)

    def _paths(self, session) -> list[ScoredPath]:
        c = self.config
        root = session.pending[-1]
        self.copy_mode = self.copy_mode or ends_in_repeat(session.ids, COPY_NGRAM)
        paths = []
        esp_tree, esp_scores = ranked_tree(root, self.esp.depths, c.esp_nodes, c.branching)
        factor = self.auto.calibration.factor if self.auto else 1.0
        for leaf in range(len(esp_tree)):  # every node's path (shared prefixes merge)
            nodes = esp_tree.path_to(leaf)
            depths = range(1, len(nodes) + 1)
            paths.append(ScoredPath("esp", [esp_tree.tokens[i] for i in nodes], [min(1.0, esp_scores[i] * factor**d) for i, d in zip(nodes, depths)]))
        for source, seqs in (
            ("pld", find_continuations(session.ids, c.max_ngram, 1, c.num_pred_tokens, c.max_candidates)),
            ("pool", [list(g) for g in self.pool.lookup(root)]),
        ):
            for rank, seq in enumerate(seqs):
                label = f"{source}#{min(rank, MAX_RANK_BUCKET)}"  # the first-ranked candidate is measured apart
                if self.copy_mode:
                    label += "@copy"
                score, scores = 1.0, []
                for d in range(1, len(seq) + 1):
                    score *= self.rates.rate(label, d)
                    if score < MIN_SCORE:  # a node this unlikely never pays for its row
                        break
                    scores.append(score)
                if scores:
                    paths.append(ScoredPath(label, seq[: len(scores)], scores))
                if seq:
                    self.first_candidates.append((label, seq[0], None))
        scored = []
        if self.matrix is not None:
            scored.append(("recycle", *self.matrix.expand(root, c.source_nodes, 8)))
        if self.suffix is not None:
            self.suffix.advance(session.ids)
            scored.append(("suffix", *self.suffix.candidates(session.ids, c.source_nodes)))
        for name, tree, scores in scored:
            paths += scored_paths(name, tree, scores, self.calibration[name].factor)
            first = next((i for i, p in enumerate(tree.parents) if p == ROOT), None)
            if first is not None:
                self.first_candidates.append((name, tree.tokens[first], scores[first]))
        return paths

    def propose(self, session) -> Proposal:
        c = self.config
        self.esp_depths_before = self.esp.depths
        self.first_candidates = []  # (label, first token) of every copied candidate, offered or not
        tree, scores, sources = merge_scored(self._paths(session))
        self.chain = None
        if not getattr(session.target, "verifies_trees", True):  # a chains-only backend: the best path of the trie
            tree, chain = tree.main_chain_tree()
            scores, sources = [scores[i] for i in chain], [sources[i] for i in chain]
            if self.auto is not None:  # the best path's scores, on measured acceptance (the winner's curse)
                raw = [s / (scores[i - 1] if i else 1.0) for i, s in enumerate(scores)]
                self.chain = (list(tree.tokens), raw)
                scores = self.chain_calibration.path_scores(raw)
        # mask rows follow the root and ESP's nodes only: after a copied (pld/pool) node they would
        # mostly be wasted rows, and rows are what a forward costs on a CPU
        esp_before = [0]
        for src in sources:
            esp_before.append(esp_before[-1] + ("esp" in src))
        masks = getattr(session.target, "runs_aux_rows", True)  # llama.cpp with streams of their own runs no mask rows
        if self.auto is not None and masks:
            # ESP's mask rows cost rows in this forward and pay next step (its candidates): where a
            # row costs much (a steep cost curve) and ESP's candidates add little, run without them
            plans = {"masks": (lambda n: Layout.rows_of(n, c.masks * (1 + esp_before[n])), self.esp_gain),
                     "bare": (lambda n: Layout.rows_of(n), 0.0)}
            plan, n = self.auto.choose_plan(scores[: c.max_budget], plans)
            self.steps_bare = 0 if plan == "masks" else self.steps_bare + 1
            # now and then measure ESP again: where mask rows could pay at twice the gain assumed at the start
            worth_a_look = (1 + 2 * ESP_GAIN_PRIOR) * self.auto.cost(1) > self.auto.cost(1 + c.masks)
            masks = plan == "masks" or (self.steps_bare >= EXPLORE_EVERY and worth_a_look)
            if masks:
                self.steps_bare = 0
        elif self.auto is not None:
            n = self.auto.choose(scores[: c.max_budget], lambda n: Layout.rows_of(n))
        else:
            n = c.budget
        tree, self.sources = tree.prefix(n), sources[:n]
        self.esp_offered = any("esp" in src for src in self.sources)
        if not masks:
            return Proposal(tree)
        anchors = [i for i, src in enumerate(self.sources) if "esp" in src]
        return Proposal(tree, self.esp.mask_rows(session, tree, anchors))

    def observe(self, session, step: StepResult) -> None:
        c = self.config
        tree = step.proposal.tree
        path = step.acceptance.path
        tested_first = set()  # labels whose depth-1 node the target tested
        if len(tree):
            on_path = set(path)
            depths = tree.depths()
            esp_pred, esp_acc = 0.0, 0
            for i in nodes_tested(tree.parents, path):
                for source, cond in self.sources[i].items():
                    if source in SCORED_SOURCES:
                        self.calibration[source].update(cond, i in on_path)
                    elif source != "esp":
                        self.rates.update(source, depths[i], i in on_path)
                    if depths[i] == 1:
                        tested_first.add(source)
                if self.auto is not None and "esp" in self.sources[i]:  # ESP's calibration: raw probability vs outcome
                    esp_pred += self._esp_conditional(tree.tokens[i], depths[i])
                    esp_acc += i in on_path
            if self.auto is not None:
                self.auto.calibration.update(esp_pred, esp_acc)
        # candidates the budget left out are measured for free against the token the target chose
        # (accepting a point-mass candidate c has probability p(c), which is also the chance that
        # the target's own token is c): on a steep cost curve this is the only evidence there is
        chosen = step.acceptance.tokens[0]
        for label, token, cond in self.first_candidates:
            if label not in tested_first:
                if label in SCORED_SOURCES:
                    self.calibration[label].update(cond, token == chosen)
                else:
                    self.rates.update(label, 1, token == chosen)
                tested_first.add(label)
        self.first_candidates = []
        if self.chain is not None:  # the whole best chain, drafted or not, against the target's tokens
            self.chain_calibration.learn(*self.chain, step.acceptance.tokens)
        if self.matrix is not None:  # the target's rows of this forward, recycled (token_recycling.py)
            rows, tokens = computed_rows(step, getattr(session.target, "verifies_trees", True))
            self.matrix.update([session.ids[len(session.ids) - len(step.emitted) - 1], *tokens], step.output.logits[rows])
        copied = sum(1 for i in path if any(src != "esp" for src in self.sources[i])) if len(tree) else 0
        self.copy_mode = copied >= COPY_RUN
        if self.esp_depths_before:  # ESP had candidates this step: what they added that no copy did
            only_esp = sum(1 for i in path if set(self.sources[i]) == {"esp"}) if len(tree) else 0
            self.esp_gain = (1 - GAIN_RATE) * self.esp_gain + GAIN_RATE * only_esp
        self.esp.observe(session, step)  # next step's ESP candidates from the masks at the last accepted node
        self.pool.add_text(session.ids, self.pooled_upto)
        self.pooled_upto = max(0, len(session.ids) - c.ngram + 1)

    def finish(self, session) -> None:
        if self.suffix is not None:
            self.suffix.global_outputs.add(session.generated)

    def _esp_conditional(self, token: int, depth: int) -> float:
        """ESP's raw probability for `token` at `depth` (0 when ESP did not rank it)."""
        if depth - 1 >= len(self.esp_depths_before):
            return 0.0
        cands = self.esp_depths_before[depth - 1]
        try:
            return cands.probs[cands.tokens.index(token)]
        except ValueError:
            return 0.0
