// Command memberlist-node: one HashiCorp memberlist member with its LAN defaults, for
// bench/gossip_detect.py. It binds -bind:-port, joins -join (retrying), and prints one
// line per membership change on stdout, flushed at once:
//
//	JOIN <name> <unix-nanos>
//	DEAD <name> <unix-nanos>     (NotifyLeave: memberlist declared it dead, or it left)
//	READY <n-members> <unix-nanos>
//
// Build offline against Debian's packaged sources (GOPATH mode):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o memberlist-node .
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/memberlist"
)

var outMu sync.Mutex

func emit(kind, name string) {
	outMu.Lock()
	defer outMu.Unlock()
	fmt.Fprintf(os.Stdout, "%s %s %d\n", kind, name, time.Now().UnixNano())
}

type events struct{}

func (events) NotifyJoin(n *memberlist.Node)   { emit("JOIN", n.Name) }
func (events) NotifyLeave(n *memberlist.Node)  { emit("DEAD", n.Name) }
func (events) NotifyUpdate(n *memberlist.Node) {}

func main() {
	name := flag.String("name", "", "node name")
	bind := flag.String("bind", "", "address to bind and advertise")
	port := flag.Int("port", 7946, "UDP and TCP port")
	join := flag.String("join", "", "seed host:port (comma-separated); empty for the first member")
	verbose := flag.Bool("v", false, "memberlist's own log on stderr")
	flag.Parse()
	if *name == "" || *bind == "" {
		fmt.Fprintln(os.Stderr, "usage: memberlist-node -name N -bind ADDR [-port P] [-join HOST:PORT]")
		os.Exit(2)
	}

	cfg := memberlist.DefaultLANConfig() // the defaults under test: nothing else tuned
	cfg.Name = *name
	cfg.BindAddr = *bind
	cfg.BindPort = *port
	cfg.AdvertiseAddr = *bind
	cfg.AdvertisePort = *port
	cfg.Events = events{}
	if !*verbose {
		cfg.LogOutput = io.Discard
	} else {
		cfg.Logger = nil
		cfg.LogOutput = os.Stderr
	}

	ml, err := memberlist.Create(cfg)
	if err != nil {
		log.Fatalf("create: %v", err)
	}
	if *join != "" {
		seeds := strings.Split(*join, ",")
		backoff := 100 * time.Millisecond
		for {
			if _, err := ml.Join(seeds); err == nil {
				break
			} else if *verbose {
				fmt.Fprintf(os.Stderr, "join: %v\n", err)
			}
			time.Sleep(backoff)
			if backoff < 2*time.Second {
				backoff *= 2
			}
		}
	}
	emit("READY", fmt.Sprint(ml.NumMembers()))

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	_ = ml.Leave(time.Second)
	_ = ml.Shutdown()
}
