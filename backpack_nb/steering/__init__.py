"""Steering a Backpack: the paper's three interventions (Hewitt et al., ACL 2023, §6) as
runnable, measured protocols (``../shared/design/steering.md`` holds their facts).

Read in this order: :mod:`.words` (the word lists and prompts, data files in ``data/``, and
which words a model's vocabulary can take), :mod:`.gender` (bias ratio, Remove, Optimize, the
projection baseline), :mod:`.topic` (sense scores, bands, annealed generation, metrics),
:mod:`.edit` (knowledge editing). Every experiment steers through one object,
:class:`backpack_nb.models.intervention.Intervention`. ``python -m backpack_nb.steering
gender|topic|edit --model_path ...`` runs them (:mod:`.__main__`).
"""
