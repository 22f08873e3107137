"""Small-data diagnostics: memorisation, forgetting and training-data perplexity.

`measures` holds the pure arithmetic (edit distance, rates, perplexity summaries, the
data-perplexity warning); `probes` runs the bounded model passes that feed it (torch).
"""

from kubetune.diagnostics.measures import (
    DiagnosticsSettings,
    MemorizationResult,
    PerplexitySummary,
    data_perplexity_warning,
    edit_distance,
    memorization_result,
    perplexity_summary,
    probe_token_budget,
    probe_window,
    should_probe,
)

__all__ = [
    "DiagnosticsSettings",
    "MemorizationResult",
    "PerplexitySummary",
    "data_perplexity_warning",
    "edit_distance",
    "memorization_result",
    "perplexity_summary",
    "probe_token_budget",
    "probe_window",
    "should_probe",
]
