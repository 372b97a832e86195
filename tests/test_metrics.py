from peftlab.metrics import classification_figures


def test_figures_match_a_hand_computation():
    gold = [0, 0, 0, 1, 1, 1, 1, 1]
    pred = [0, 0, 1, 1, 1, 1, 0, 1]
    f = classification_figures(gold, pred, ["a", "b"])
    assert f["accuracy"] == 0.75
    assert f["confusion_matrix"] == [[2, 1], [1, 4]]
    # F1(a) = 2*2/(3+3) = 0.6667, F1(b) = 2*4/(5+5) = 0.8
    assert abs(f["macro_f1"] - (2 / 3 + 0.8) / 2) < 1e-6
    assert f["n_eval"] == 8


def test_a_label_never_predicted_scores_zero_f1():
    f = classification_figures([0, 1, 1], [1, 1, 1], ["a", "b"])
    assert f["macro_f1"] == round((0 + 0.8) / 2, 6)
