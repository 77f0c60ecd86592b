//! Shared building blocks every model family is assembled from.

