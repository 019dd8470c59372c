module example.com/egpwned

go 1.19
