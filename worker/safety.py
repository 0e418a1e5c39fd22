"""Output safety of an AI draft: impression filters, critical findings, image dependence.

Everything here is a pure function of the :class:`~worker.bundle.InferenceResult` and
the report :class:`~plugin.reports.template.Template` — no database, no model call —
except :func:`image_dependence_probe`, which re-scores the questions with a blank image.
:func:`apply_safety` runs all of it once after :func:`worker.model.engine.run_bundle`
and returns the result with a cleaned impression plus a :class:`SafetyReport` that the
SR builders (:func:`plugin.reports.sr.build_measurement_report`,
:func:`~plugin.reports.sr.build_narrative_report`) write as report-level TEXT items.

Impression checks (:func:`check_impression`)
--------------------------------------------
The impression is split into sentences (at ``.``, ``!``, ``?``, ``;`` followed by space).

1. *Treatment advice* — a sentence is replaced by ``[removed: treatment advice]`` when it
   matches one of :data:`TREATMENT_PATTERNS`: a treatment verb ("start", "initiate",
   "prescribe", "administer", "titrate", "discontinue"), "recommend/advise/suggest …"
   followed in the same sentence by therapy, treatment, medication, surgery, an
   intervention or a drug, an intervention noun (surgery, pericardiocentesis, PCI,
   CABG, ablation, ICD, pacemaker, transplant, stent) or a drug / drug class of
   :data:`DRUG_NAMES`. A draft for a radiologist describes images; it never treats.
2. *Certainty language* — a sentence with "definitely", "certainly", "no doubt",
   "undoubtedly", "unequivocally", "without (a) doubt", "conclusively", "guaranteed",
   "absolutely" or "100 %" is replaced by ``[removed: certainty language]``: a small
   model's draft must not claim certainty it does not have. (Not "definite" alone: it
   is an answer option of the thrombus value set, CID 3714.)
3. *Contradictions* — :data:`CONTRADICTION_RULES`, checked on the cleaned impression
   against the scored answers. A rule fires when the finding's answer is one of its
   option ids and the impression *affirms* its pattern. "Affirms" means the match is not
   preceded, within the same sentence and at most four words before it, by a negation
   ("no", "not", "without", "absent", "negative for", "free of"), so "no large
   effusion" does not affirm "large effusion"; patterns that are themselves negative
   ("no effusion") are matched as they are. Rules whose finding or options the template
   lacks are skipped. Contradictions are flagged, not removed: the radiologist decides.

Image dependence (:func:`image_dependence_probe`)
-------------------------------------------------
Each question is scored with the real mosaic and with a black image of the same size.
If no option probability of any finding moves by at least :data:`PROBE_THRESHOLD`
(0.02, two percentage points), the answers are flagged as not depending on the images.
Rationale: option probabilities are a softmax over 2–6 options; a model that reads the
pixels changes them by far more than 0.02 between a cardiac cine mosaic and an empty
frame, while a model that answers from the text alone (the failure this catches: a
prompt or adapter that made the model ignore the image tokens) changes them by float
noise only (< 1e-4). The probe costs one extra ``score_options`` per question.

Critical-finding notification (:func:`notify_critical`)
-------------------------------------------------------
``hook`` comes from the configuration. Only the shell-command form is implemented: the
command runs with ``/bin/sh -c`` (it is the administrator's own config, as trusted as
the config file), a timeout (default 10 s), the job id and the criticals in the
environment (``CMR_AI_JOB_ID``, ``CMR_AI_CRITICALS`` = ``finding=option`` pairs joined
by ``;``) and as JSON on stdin (``{"job_id": 7, "criticals": [{"finding": …,
"option": …}]}``). An ``http://`` / ``https://`` hook is logged as not implemented.
The hook never raises: it returns whether the command ran and exited 0.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field

from worker.bundle import AnalysisBundle, FindingResult, InferenceResult

if TYPE_CHECKING:  # pragma: no cover
    from plugin.reports.template import Template

__all__ = [
    "CONTRADICTION_RULES",
    "DRUG_NAMES",
    "PROBE_THRESHOLD",
    "ContradictionRule",
    "FlagKind",
    "ProbeResult",
    "SafetyFlag",
    "SafetyReport",
    "apply_safety",
    "check_impression",
    "critical_findings",
    "image_dependence_probe",
    "notify_critical",
]

log = logging.getLogger(__name__)

#: Largest absolute change of any option probability (real images vs. a black image)
#: below which the answers count as image-independent. See the module docstring.
PROBE_THRESHOLD = 0.02

REMOVED_TREATMENT = "[removed: treatment advice]"
REMOVED_DEGENERATE = "[removed: repetitive text]"
REMOVED_CERTAINTY = "[removed: certainty language]"


class FlagKind(str, Enum):
    """What a safety flag is about."""

    CONTRADICTION = "contradiction"
    TREATMENT_ADVICE = "treatment_advice"
    CERTAINTY = "certainty_language"
    IMAGE_INDEPENDENT = "image_independent"
    DEGENERATE = "degenerate_text"


class SafetyFlag(BaseModel):
    """One finding of the safety checks, written into the SR as ``AI SAFETY FLAG: <message>``."""

    model_config = ConfigDict(frozen=True)

    kind: FlagKind
    message: str
    finding_id: Optional[str] = None
    option_id: Optional[str] = None
    text: str = ""  # the sentence that was removed or that contradicts


class ProbeResult(BaseModel):
    """Outcome of :func:`image_dependence_probe`."""

    model_config = ConfigDict(frozen=True)

    max_abs_diff: float  # over all findings and options
    threshold: float
    flagged: bool  # max_abs_diff < threshold: answers do not depend on the images
    per_finding: dict[str, float] = Field(default_factory=dict)  # finding id -> max |Δp|
    seconds: float = 0.0


class SafetyReport(BaseModel):
    """Everything the safety pass found; travels infer → report beside the result."""

    flags: list[SafetyFlag] = Field(default_factory=list)
    criticals: list[tuple[str, str]] = Field(default_factory=list)  # (finding id, option id)
    probe: Optional[ProbeResult] = None
    impression_original: str = ""
    impression_cleaned: str = ""

    def messages(self) -> list[str]:
        """One ``AI SAFETY FLAG: …`` line per flag, in order."""
        return [f"AI SAFETY FLAG: {f.message}" for f in self.flags]


# --------------------------------------------------------------------------- rules

DRUG_NAMES: tuple[str, ...] = (
    # drug classes
    "beta[- ]?blockers?", "ace[- ]?inhibitors?", "arbs?", "arni", "sglt2[- ]?inhibitors?",
    "diuretics?", "anticoagula\\w*", "antiplatelets?", "statins?", "steroids?", "nsaids?",
    "mineralocorticoid receptor antagonists?", "inotropes?",
    # drugs common in cardiology
    "metoprolol", "bisoprolol", "carvedilol", "nebivolol", "ramipril", "lisinopril", "enalapril",
    "perindopril", "candesartan", "losartan", "valsartan", "sacubitril", "spironolactone",
    "eplerenone", "furosemide", "torasemide", "bumetanide", "dapagliflozin", "empagliflozin",
    "aspirin", "clopidogrel", "ticagrelor", "prasugrel", "warfarin", "apixaban", "rivaroxaban",
    "edoxaban", "dabigatran", "heparin", "atorvastatin", "rosuvastatin", "amiodarone", "digoxin",
    "ivabradine", "colchicine", "ibuprofen", "prednisolone", "prednisone", "dobutamine",
    "milrinone", "tafamidis", "mavacamten",
)

TREATMENT_PATTERNS: tuple[re.Pattern, ...] = tuple(re.compile(p, re.I) for p in (
    r"\b(start|starting|initiate|initiating|commence|prescribe[sd]?|prescribing|administer\w*"
    r"|titrat\w*|discontinue\w*)\b",
    r"\b(recommend\w*|advise[sd]?|advising|suggest\w*|should (receive|undergo|be treated))\b.*"
    r"\b(therapy|treatment|medication|medicine|drugs?|surgery|surgical|intervention|procedure"
    r"|ablation|implant\w*|pericardiocentesis|revasculari[sz]ation)\b",
    r"\b(surgery|surgical repair|pericardiocentesis|pci|cabg|bypass graft\w*|ablation|icd"
    r"|pacemaker|heart transplant\w*|stenting|valve replacement|tavi|tavr)\b",
    r"\b(" + "|".join(DRUG_NAMES) + r")\b",
))

CERTAINTY_PATTERN = re.compile(
    r"\b(definitely|certainly|no doubt|undoubtedly|unequivocal(ly)?|without (a )?doubt"
    r"|conclusive(ly)?|guaranteed?|absolutely)\b|\b100\s*(%|percent\b)", re.I)

_NEGATION = re.compile(r"\b(no|not|without|absent|negative for|free of|nor|neither)\b", re.I)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;])\s+")


@dataclass(frozen=True)
class ContradictionRule:
    """The impression affirms ``pattern`` while ``finding_id``'s answer is in ``options``.

    ``negated=True`` marks a pattern that is itself a negative statement ("no
    effusion"): it is matched as it is, without the negation look-back.
    """

    finding_id: str
    options: frozenset[str]
    pattern: re.Pattern
    message: str
    negated: bool = False


def _rule(fid: str, options: Sequence[str], pattern: str, message: str, negated: bool = False) -> ContradictionRule:
    return ContradictionRule(fid, frozenset(options), re.compile(pattern, re.I), message, negated)


_NORMAL_STUDY = (r"\b(normal (cardiac )?(study|examination|exam|cardiac mri|cmr|mri|scan|heart)"
                 r"|unremarkable( study| examination)?|no (significant |relevant )?(abnormalit(y|ies)"
                 r"|pathology|findings))\b")
_LV = r"(lv |left ventricular |left ventricle |biventricular )"
_REDUCED_LV = (r"\b((reduced|impaired|depressed|decreased|poor|diminished) " + _LV + r"?(systolic )?"
               r"(function|ejection fraction|ef|contractility)|" + _LV + r"(systolic )?dysfunction"
               r"|heart failure)\b")
_NORMAL_LV = (r"\b((normal|preserved|good) " + _LV + r"?(systolic )?(function|ejection fraction|ef)"
              r"|" + _LV + r"(systolic )?function (is )?(normal|preserved))\b")
_EFFUSION = r"\b(pericardial )?effusion\b"
_NO_EFFUSION = r"\b(no|without|absent) (\w+ )?(pericardial )?effusion\b|\beffusion (is )?absent\b"
_SIG_EFFUSION = r"\b(moderate|large|significant|sizeable|big|extensive|marked) (\w+ )?(pericardial )?effusion\b"
_LV_DILATED = (r"\b((dilated|enlarged) (lv|left ventric\w*)|(lv|left ventric\w*) (cavity )?(is )?"
               r"(dilated|enlarged)|(lv|left ventricular) dilat\w*)\b")

#: The contradiction rules (finding id, answers, what the impression must not affirm).
CONTRADICTION_RULES: tuple[ContradictionRule, ...] = (
    _rule("pericardial_effusion", ("moderate", "large"), _NO_EFFUSION,
          "it says no pericardial effusion",
          negated=True),
    _rule("pericardial_effusion", ("moderate", "large"), _NORMAL_STUDY,
          "it calls the study normal"),
    _rule("pericardial_effusion", ("none",), _SIG_EFFUSION,
          "it describes a pericardial effusion"),
    _rule("lv_systolic_function", ("normal",), _REDUCED_LV,
          "it says reduced LV function"),
    _rule("lv_systolic_function", ("moderately_reduced", "severely_reduced"), _NORMAL_LV,
          "it says normal LV function"),
    _rule("lv_systolic_function", ("moderately_reduced", "severely_reduced"), _NORMAL_STUDY,
          "it calls the study normal"),
    _rule("lv_size", ("normal", "small"), _LV_DILATED,
          "it says the LV is dilated"),
    _rule("overall_assessment", ("abnormal",), _NORMAL_STUDY,
          "it calls the study normal"),
    _rule("image_quality", ("non_diagnostic",), _NORMAL_STUDY,
          "it calls the study normal"),
)


# --------------------------------------------------------------------------- impression


def _sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENTENCE_SPLIT.split(" ".join(text.split()))) if s]


def _affirms(sentence: str, pattern: re.Pattern, negated: bool) -> bool:
    for m in pattern.finditer(sentence):
        if negated:
            return True
        before = sentence[: m.start()].split()[-4:]
        if not _NEGATION.search(" ".join(before)):
            return True
    return False


def _answers(findings: Sequence[FindingResult] | dict[str, str]) -> dict[str, str]:
    if isinstance(findings, dict):
        return dict(findings)
    return {f.id: f.answer for f in findings}


def _degenerate(text: str) -> bool:
    """A generation stuck in a loop: at least 8 words, half of them one and the same word."""
    words = re.findall(r"[\w'-]+", text.lower())
    if len(words) < 8:
        return False
    from collections import Counter

    return Counter(words).most_common(1)[0][1] * 2 >= len(words)


def check_impression(
    impression: str,
    findings: Sequence[FindingResult] | dict[str, str],
    template: "Template",
) -> tuple[str, list[SafetyFlag]]:
    """Filter treatment advice and certainty language out of ``impression``; flag contradictions.

    Parameters
    ----------
    impression:
        The model's free text.
    findings:
        The scored findings (``InferenceResult.findings``) or a mapping finding id -> option id.
    template:
        The report template; contradiction rules about findings or options it lacks are skipped.

    Returns
    -------
    tuple
        (cleaned impression, flags): removed sentences are replaced by
        ``[removed: treatment advice]`` / ``[removed: certainty language]``; one flag per
        removed sentence and per contradiction rule that fired (each rule once).
    """
    answers = _answers(findings)
    flags: list[SafetyFlag] = []
    kept: list[str] = []
    out: list[str] = []
    if _degenerate(impression):
        flags.append(SafetyFlag(kind=FlagKind.DEGENERATE, text=impression[:200],
                                message="the model's impression was one word repeated: removed"))
        return REMOVED_DEGENERATE, flags
    for s in _sentences(impression):
        if any(p.search(s) for p in TREATMENT_PATTERNS):
            out.append(REMOVED_TREATMENT)
            flags.append(SafetyFlag(kind=FlagKind.TREATMENT_ADVICE, text=s,
                                    message="treatment advice removed from the impression"))
        elif CERTAINTY_PATTERN.search(s):
            out.append(REMOVED_CERTAINTY)
            flags.append(SafetyFlag(kind=FlagKind.CERTAINTY, text=s,
                                    message="certainty language removed from the impression"))
        else:
            out.append(s)
            kept.append(s)

    known = {f.id: {o.id for o in f.options} for f in template.findings}
    for rule in CONTRADICTION_RULES:
        answer = answers.get(rule.finding_id)
        if rule.finding_id not in known or answer is None or answer not in rule.options:
            continue
        if not rule.options & known[rule.finding_id]:
            continue
        hit = next((s for s in kept if _affirms(s, rule.pattern, rule.negated)), None)
        if hit is None:
            continue
        option = template.finding(rule.finding_id).option(answer)
        topic = template.finding(rule.finding_id).topic
        flags.append(SafetyFlag(kind=FlagKind.CONTRADICTION, finding_id=rule.finding_id, option_id=answer,
                                text=hit, message=f"impression contradicts finding {topic}: {option.text} "
                                                  f"({rule.message}: \"{hit}\")"))
    return " ".join(out), flags


def critical_findings(result: InferenceResult, template: "Template") -> list[tuple[str, str]]:
    """``(finding id, option id)`` of every answer listed in its finding's ``critical``, template order."""
    answers = _answers(result.findings)
    return [(f.id, answers[f.id]) for f in template.findings if f.id in answers and f.is_critical(answers[f.id])]


# --------------------------------------------------------------------------- probe


def image_dependence_probe(
    engine: Any,
    bundle: AnalysisBundle,
    *,
    threshold: float = PROBE_THRESHOLD,
    reference: Optional[InferenceResult] = None,
) -> ProbeResult:
    """Score every question with the real images and with a black image of the same size.

    Parameters
    ----------
    engine:
        A loaded :class:`worker.model.engine.Engine` (only ``score_options`` is used).
    bundle:
        The analysis bundle the result was computed from.
    threshold:
        ``flagged`` when the largest absolute probability change is below it.
    reference:
        The result ``run_bundle`` computed on ``bundle`` with this same engine: its
        probabilities stand in for the real-image scores (they are the same
        deterministic computation), which halves the cost. Without it the real images
        are scored here too.

    Returns
    -------
    ProbeResult
        Questions without images (a bundle without images) are left out; with none
        left, ``max_abs_diff`` is 0 and nothing is flagged (there is nothing to depend on).
    """
    from PIL import Image as PILImage

    from worker.model.engine import question_mosaic, question_text

    t0 = time.perf_counter()
    pil = {im.key: im.to_pil() for im in bundle.images}
    ref = {f.id: f.probabilities for f in reference.findings} if reference is not None else {}
    per: dict[str, float] = {}
    for q in bundle.questions:
        images = question_mosaic(pil, bundle.question_images(q), q.zoom)  # what run_bundle shows
        if not images:
            continue
        text = question_text(bundle, q)  # with the clinical context, as run_bundle asks it
        if q.id in ref and all(o in ref[q.id] for o in q.options):
            real = [float(ref[q.id][o]) for o in q.options]
        else:
            real = engine.score_options(images, text, q.option_texts)
        blank = [PILImage.new("RGB", im.size, (0, 0, 0)) for im in images]
        empty = engine.score_options(blank, text, q.option_texts)
        per[q.id] = max(abs(a - b) for a, b in zip(real, empty))
    worst = max(per.values(), default=0.0)
    return ProbeResult(max_abs_diff=worst, threshold=threshold, flagged=bool(per) and worst < threshold,
                       per_finding=per, seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------- all together


def apply_safety(
    engine: Any,
    bundle: AnalysisBundle,
    result: InferenceResult,
    template: "Template",
    *,
    probe: bool = True,
    threshold: float = PROBE_THRESHOLD,
) -> tuple[InferenceResult, SafetyReport]:
    """The safety pass after ``run_bundle``: clean the impression, list criticals, probe.

    Returns
    -------
    tuple
        (a copy of ``result`` with the cleaned impression, the :class:`SafetyReport`).
        ``result`` itself is not changed.
    """
    cleaned, flags = check_impression(result.impression, result.findings, template)
    probe_result = None
    if probe:
        probe_result = image_dependence_probe(engine, bundle, threshold=threshold, reference=result)
        if probe_result.flagged:
            flags.append(SafetyFlag(
                kind=FlagKind.IMAGE_INDEPENDENT,
                message=(f"answers did not depend on the images (largest probability change with a "
                         f"blank image {probe_result.max_abs_diff:.4f} < {threshold:g})")))
    report = SafetyReport(flags=flags, criticals=critical_findings(result, template), probe=probe_result,
                          impression_original=result.impression, impression_cleaned=cleaned)
    return result.model_copy(update={"impression": cleaned}), report


def notify_critical(
    criticals: Sequence[tuple[str, str]],
    job_id: int,
    hook: Optional[str],
    *,
    timeout: float = 10.0,
) -> bool:
    """Run the configured critical-finding hook; see the module docstring.

    Parameters
    ----------
    criticals:
        From :func:`critical_findings`; nothing runs when empty.
    job_id:
        The job, passed on to the hook.
    hook:
        A shell command (run with ``/bin/sh -c``) or None / "" for no hook.
    timeout:
        Seconds before the command is killed.

    Returns
    -------
    bool
        True when the command ran and exited 0; never raises.
    """
    if not hook or not criticals:
        return False
    if re.match(r"^https?://", hook.strip(), re.I):
        log.warning("job %s: critical-finding hook %r is an HTTP URL; only shell commands are implemented",
                    job_id, hook)
        return False
    pairs = [(str(f), str(o)) for f, o in criticals]
    env = {**os.environ, "CMR_AI_JOB_ID": str(job_id),
           "CMR_AI_CRITICALS": ";".join(f"{f}={o}" for f, o in pairs)}
    payload = json.dumps({"job_id": job_id, "criticals": [{"finding": f, "option": o} for f, o in pairs]})
    try:
        proc = subprocess.run(hook, shell=True, input=payload, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        log.error("job %s: critical-finding hook timed out after %g s: %s", job_id, timeout, hook)
        return False
    except OSError as e:
        log.error("job %s: critical-finding hook %r could not run: %s", job_id, hook, e)
        return False
    if proc.returncode != 0:
        log.error("job %s: critical-finding hook exited %d: %s", job_id, proc.returncode,
                  (proc.stderr or proc.stdout).strip()[:500])
        return False
    log.info("job %s: critical-finding hook ran for %s", job_id, payload)
    return True
