"""The 57 MMLU subjects and the four category groups used to report MMLU by area.

The grouping is the one of lm-evaluation-harness (`tasks/mmlu/_generate_configs.py`), which is
what most published per-group MMLU numbers use. It follows the MMLU paper's categories
(hendrycks/test `categories.py`) except for one subject: the paper puts `anatomy` under
"other (business, health, misc.)"; lm-evaluation-harness puts it under STEM. We follow the
harness so that group scores compare with the numbers people usually quote.
"""

from __future__ import annotations

from enum import Enum


class MMLUGroup(str, Enum):
    """A category group of MMLU subjects."""

    STEM = "stem"
    HUMANITIES = "humanities"
    SOCIAL_SCIENCES = "social_sciences"
    OTHER = "other"


_S, _H, _SS, _O = MMLUGroup.STEM, MMLUGroup.HUMANITIES, MMLUGroup.SOCIAL_SCIENCES, MMLUGroup.OTHER

# Subject names exactly as in the `subject` field of `cais/mmlu` (config "all"), alphabetical.
MMLU_SUBJECT_GROUP: dict[str, MMLUGroup] = {
    "abstract_algebra": _S,
    "anatomy": _S,
    "astronomy": _S,
    "business_ethics": _O,
    "clinical_knowledge": _O,
    "college_biology": _S,
    "college_chemistry": _S,
    "college_computer_science": _S,
    "college_mathematics": _S,
    "college_medicine": _O,
    "college_physics": _S,
    "computer_security": _S,
    "conceptual_physics": _S,
    "econometrics": _SS,
    "electrical_engineering": _S,
    "elementary_mathematics": _S,
    "formal_logic": _H,
    "global_facts": _O,
    "high_school_biology": _S,
    "high_school_chemistry": _S,
    "high_school_computer_science": _S,
    "high_school_european_history": _H,
    "high_school_geography": _SS,
    "high_school_government_and_politics": _SS,
    "high_school_macroeconomics": _SS,
    "high_school_mathematics": _S,
    "high_school_microeconomics": _SS,
    "high_school_physics": _S,
    "high_school_psychology": _SS,
    "high_school_statistics": _S,
    "high_school_us_history": _H,
    "high_school_world_history": _H,
    "human_aging": _O,
    "human_sexuality": _SS,
    "international_law": _H,
    "jurisprudence": _H,
    "logical_fallacies": _H,
    "machine_learning": _S,
    "management": _O,
    "marketing": _O,
    "medical_genetics": _O,
    "miscellaneous": _O,
    "moral_disputes": _H,
    "moral_scenarios": _H,
    "nutrition": _O,
    "philosophy": _H,
    "prehistory": _H,
    "professional_accounting": _O,
    "professional_law": _H,
    "professional_medicine": _O,
    "professional_psychology": _SS,
    "public_relations": _SS,
    "security_studies": _SS,
    "sociology": _SS,
    "us_foreign_policy": _SS,
    "virology": _O,
    "world_religions": _H,
}

MMLU_SUBJECTS: tuple[str, ...] = tuple(MMLU_SUBJECT_GROUP)


def subjects_in_group(group: MMLUGroup | str) -> list[str]:
    """The subjects of one group, in alphabetical order."""
    group = MMLUGroup(group)
    return [s for s, g in MMLU_SUBJECT_GROUP.items() if g is group]
