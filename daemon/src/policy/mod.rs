//! NetworkPolicy: compiled per-pod verdict tables, the same engine for the packet loop and
//! `kwire policy trace`.
