"""The PyTorch trainer (installed as apr_trainer): `train.train()` builds a run from one module per concern."""
