"""Rate–accuracy studies: ``platform evaluate`` measures every point of a sweep and writes the report.

Modules: :mod:`.sweep` (the sweep file), :mod:`.methods` (bundles through the gateway runtime; JPEG,
WebP and CompressAI image codecs through the uncompressed teacher), :mod:`.tasks` (ground truth and
scoring through the plugins' metric code), :mod:`.metrics` (BD-rate, Δ-accuracy), :mod:`.complexity`
(parameters, MACs, latency), :mod:`.link` (link-bandwidth model), :mod:`.bitmaps` (bit-allocation
maps), :mod:`.imagecodec` (CompressAI codecs: training, container, coding), :mod:`.report` and
:mod:`.run` (orchestration).
"""
