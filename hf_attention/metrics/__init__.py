"""`evaluate` metric scripts (sacreBLEU BLEU and chrF), loaded by path so that scoring needs no network."""
