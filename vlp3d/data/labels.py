"""CT-RATE label names, the subset the phantom renders, and which take no article in prompts
(the prompts themselves: vlp3d.evaluation.prompts)."""

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
