"""CT-RATE label names, the subset the phantom renders, and zero-shot prompts."""

CTRATE_LABELS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

PHANTOM_FINDINGS: tuple[str, ...] = (
    "Lung nodule",
    "Pleural effusion",
    "Cardiomegaly",
    "Emphysema",
    "Consolidation",
    "Pericardial effusion",
)

ARTICLE_FREE = {"Cardiomegaly", "Emphysema", "Consolidation", "Lymphadenopathy", "Atelectasis",
                 "Bronchiectasis", "Medical material", "Lung opacity", "Mosaic attenuation pattern",
                 "Peribronchial thickening", "Interlobular septal thickening",
                 "Arterial wall calcification", "Coronary artery wall calcification",
                 "Pulmonary fibrotic sequela"}


def zero_shot_prompts(label: str) -> tuple[str, str]:
    """The positive and negative prompt for a label, e.g. 'There is a pleural effusion.'."""
    name = label.lower()
    positive = f"There is {name}." if label in ARTICLE_FREE else f"There is a {name}."
    return positive, f"There is no {name}."
