"""Verifiable tasks shipped with the project: generators of problems with exact answers, and the reward functions
that check a response against them (``models.reward.kind: function`` with ``data.label_field``)."""
