//! The snapshot filesystem (issue 5): a passthrough stacking filesystem over a LIVE directory
//! that, before any change reaches LIVE, saves the old state into the newest snapshot's layer
//! (a plain kernel overlay upper dir), plus the snapshot store, `.snapshots/NAME` views,
//! take/delete/restore and the control socket server.
//!
//! It will build on `ovl-fs`, `ovl-copyup` and `ovl-lookup`; it must never write a layer in a
//! format the stock kernel overlay cannot mount. Nothing is implemented yet.
