"""From a window of audio to a verdict: backbones embed it, KNN measures its distance to the
bank, ranking turns distances into comparable ranks and fuses them; the detector ties these
together for the daemon, ``score`` and ``evaluate`` alike."""
