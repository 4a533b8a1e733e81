"""Moving a version's operating point to where it is used: the maths (Platt refit with a
threshold held at its sensitivity bound, prevalence from unlabeled traffic) and the site
workflow that registers, gates and serves a site's own operating point. Above the scoring core,
below monitoring, which asks for it."""
