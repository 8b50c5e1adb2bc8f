//! Ferry's sources and publisher.
