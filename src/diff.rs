//! Changes of an upper layer against its lowers (docker diff rules).
