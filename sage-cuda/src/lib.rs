//! Skeleton; see its issue.
