//! Diagnostics (to come).
