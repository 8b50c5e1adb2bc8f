#!/usr/bin/env python3
"""Generates one cluster zone in three forms (Ferry manifests, a Knot zone file, Unbound
local-data) plus a dnsperf query file, so every server answers exactly the same names.

Usage: gen.py OUTDIR [SERVICES]   (default 1000; 100 Services per namespace, at least 10 namespaces)
Every 10th Service is headless with 3 ready endpoints (one with a hostname); the others are
ClusterIP (IPv4) with one named port. The query mix: 60% A of ClusterIP Services, 10% A of
headless Services, 10% SRV of named ports, 10% AAAA (NODATA), 10% NXDOMAIN.
"""
import os
import random
import sys

out = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
os.makedirs(os.path.join(out, "manifests"), exist_ok=True)
zone = "cluster.local"
namespaces = max(10, n // 100)
ttl = 30

manifests, records = {}, []
clusterip, headless = [], []
for i in range(n):
    ns, name = f"ns-{i % namespaces}", f"svc-{i}"
    fqdn = f"{name}.{ns}.svc.{zone}."
    if i % 10 == 9:
        eps = [f"10.{100 + i // 250}.{i % 250}.{k + 1}" for k in range(3)]
        manifests.setdefault(ns, []).append(
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n  clusterIP: None\n  ports: [{{name: http, port: 80}}]\n---\n"
            f"apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: {ns}, "
            f"labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\n"
            f"ports: [{{name: http, port: 80, protocol: TCP}}]\nendpoints:\n"
            + "".join(
                f"- addresses: [\"{ip}\"]\n" + ("  hostname: web-0\n" if k == 0 else "") for k, ip in enumerate(eps)
            )
        )
        for k, ip in enumerate(eps):
            host = "web-0" if k == 0 else ip.replace(".", "-")
            records.append(f"{fqdn} {ttl} IN A {ip}")
            records.append(f"{host}.{fqdn} {ttl} IN A {ip}")
            records.append(f"_http._tcp.{fqdn} {ttl} IN SRV 0 33 80 {host}.{fqdn}")
            records.append(f"{fqdn} {ttl} IN SRV 0 33 80 {host}.{fqdn}")
        headless.append(fqdn)
    else:
        ip = f"10.96.{i // 250}.{i % 250 + 1}"
        manifests.setdefault(ns, []).append(
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80}}]\n"
        )
        records.append(f"{fqdn} {ttl} IN A {ip}")
        records.append(f"_http._tcp.{fqdn} {ttl} IN SRV 0 100 80 {fqdn}")
        records.append(f"{fqdn} {ttl} IN SRV 0 100 80 {fqdn}")
        clusterip.append(fqdn)

# One file per namespace (Ferry reads at most 1024 documents per file).
for ns, docs in manifests.items():
    with open(os.path.join(out, "manifests", f"{ns}.yaml"), "w") as f:
        f.write("---\n".join(docs))

soa = f"{zone}. {ttl} IN SOA ns.dns.{zone}. hostmaster.{zone}. 1 7200 1800 86400 {ttl}"
ns_rr = f"{zone}. {ttl} IN NS ns.dns.{zone}."
with open(os.path.join(out, "cluster.local.zone"), "w") as f:
    f.write("\n".join([soa, ns_rr, f"ns.dns.{zone}. {ttl} IN A 127.0.0.1"] + records) + "\n")
with open(os.path.join(out, "unbound-local-data.conf"), "w") as f:
    f.write(f'  local-zone: "{zone}." static\n')
    for r in [soa, ns_rr] + records:
        f.write(f'  local-data: "{r}"\n')

rng = random.Random(42)
with open(os.path.join(out, "queries.txt"), "w") as f:
    for _ in range(100_000):
        x = rng.random()
        if x < 0.6:
            f.write(f"{rng.choice(clusterip)} A\n")
        elif x < 0.7:
            f.write(f"{rng.choice(headless)} A\n")
        elif x < 0.8:
            f.write(f"_http._tcp.{rng.choice(clusterip)} SRV\n")
        elif x < 0.9:
            f.write(f"{rng.choice(clusterip)} AAAA\n")
        else:
            f.write(f"missing-{rng.randrange(10**6)}.ns-{rng.randrange(namespaces)}.svc.{zone}. A\n")
