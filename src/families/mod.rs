//! Model families: small adapters over the shared blocks.

