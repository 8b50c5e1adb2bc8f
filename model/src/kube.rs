//! Translation of Kubernetes `Service` and `EndpointSlice` objects into the model.
