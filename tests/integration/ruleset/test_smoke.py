from support.netlab import Lab


def test_lab_connects(lab: Lab) -> None:
    lab.serve(lab.peer, "peer", tcp=[9999], udp=[9999])
    assert lab.request(lab.pod, lab.peer_ip, 9999).startswith("peer 9999 - 192.0.2.2")
    assert lab.request(lab.pod, "198.51.100.1", 9999, uid=1000, gid=1000).startswith("peer 9999")
    assert lab.udp(lab.pod, lab.peer_ip, 9999).startswith("peer 9999")
