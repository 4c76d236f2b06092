from vlp3d.data.report import report_text, select_sections, split_sentences


def test_sentence_splitter_on_realistic_report():
    text = (
        "Findings: A nodule of approx. 1.5 cm is seen in the right upper lobe. Dr. Smith was informed.\n"
        "1. Bilateral pleural effusion.\n2) Mild cardiomegaly\n- No pericardial effusion. "
        "Compared with the prior study (3.2 mm), e.g. stable."
    )
    assert split_sentences(text) == [
        "Findings: A nodule of approx. 1.5 cm is seen in the right upper lobe.",
        "Dr. Smith was informed.",
        "Bilateral pleural effusion.",
        "Mild cardiomegaly",
        "No pericardial effusion.",
        "Compared with the prior study (3.2 mm), e.g. stable.",
    ]


def test_sections_skip_missing_and_nan():
    row = {"Findings_EN": "  Lungs clear.  ", "Impressions_EN": float("nan"), "Technique_EN": "CT."}
    assert select_sections(row, ("Findings_EN", "Impressions_EN")) == "Lungs clear."
    text, sentences = report_text(row, ("Technique_EN", "Findings_EN"))
    assert sentences == ["CT.", "Lungs clear."] and text == "CT. Lungs clear."

